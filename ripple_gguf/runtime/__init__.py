"""The runtime: the RIPPLE backend inside llama.cpp (registration, the load wrapper, settings,
counters), activity traces and their replay, the storage cost model, the page cache, and
llama.cpp's own programs with the backend module."""
