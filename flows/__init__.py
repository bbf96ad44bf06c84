"""dtr's Prefect flows (`convert` and its sub-flows); their logs show each failure's traceback once."""

from flows.logs import show_each_traceback_once

show_each_traceback_once()
