"""One module per `dtr` sub-command; each exposes `register(app: typer.Typer)`."""
