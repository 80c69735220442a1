"""The pruning core: models, text, calibration, methods, masks, evaluation, export.

Never imports gradio or plotly; the explorer and the CLI both stand on it."""
