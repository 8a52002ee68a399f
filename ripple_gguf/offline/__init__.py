"""The offline stage and the converter: a GGUF and calibration text in, a ripple-packed GGUF out
(profile -> activity rule -> co-activation -> placement -> predictors -> quality -> file)."""
