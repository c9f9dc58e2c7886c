"""Pipelines, one module each: ``run(cfg, parts, run_dir) -> float | None`` over the parts that
``app`` built from the config. ``pipeline: <module name>`` picks one; adding a pipeline is
adding a module here."""
