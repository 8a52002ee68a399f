/* Process-wide settings (ripple_settings.c; their setters and getters are in ripple.h). */
#pragma once

struct ripple_model;

/* the mode in force for m: the mode setting, RIPPLE_MODE_AUTO resolved to m's default */
int ripple_mode_of(const struct ripple_model * m);
