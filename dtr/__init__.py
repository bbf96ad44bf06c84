"""The `dtr` command-line interface. The library lives in `dtr_core`; the pipeline in `tasks` and `flows`."""
