"""parity.checkpoint: checkpoint files <-> parity's model (`parity.model.V4ForCausalLM`).

- `layout`: the published DeepSeek-V4 FP8/FP4 layout as one table (official names <-> parity names,
  dtypes, shapes) and the name mapping derived from it (torch-free);
- `shards`: safetensors headers and index, recognising and validating the published layout (torch-free);
- `reader.from_pretrained(path, device, dtype)`: any supported checkpoint directory -> model;
  `official_reader.load_official`: the published layout, quantized or dequantized;
- `writer.export_tiny(dir, seed)` / `writer.export_model(model, dir)`: the published layout on disk;
- `default_model.ensure_default_model()`: the cached default miniature;
- `export_cli`: the ``parity export-tiny`` command.

Importing the package imports no torch; the reader and writer modules do.
"""
