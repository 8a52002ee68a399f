"""The ripple-packed GGUF format (docs/FORMAT.md): its constants and keys, the layout of a file,
the bytes of a bundle, the reader and the writer. Imports nothing of the package but the native
binding (ggml's row conversions, CRC32C)."""
