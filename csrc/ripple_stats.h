/* Counters without Python (ripple_stats.c): RIPPLE_STATS_FILE written every few seconds once a
 * model is loaded (ripple_stats_start) and when a model is freed (ripple_stats_report, which also
 * logs a summary line through ggml's logger). */
#pragma once

void ripple_stats_start(void);
void ripple_stats_report(const char * model_path);
