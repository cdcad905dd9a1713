"""Exit statuses, in one place because the man page promises them (omuscd(8), EXIT STATUS)."""

OK = 0
FAILURE = 1  # runtime failure: port in use, already running, cannot create a file
USAGE = 2  # usage or configuration error (argparse uses 2 too)
ID_CLASH = 3  # our explicit --node-id is held by a node that started earlier
STATE_IN_USE = 4  # another daemon holds the state directory's lock: nothing was touched
# omuscd ctl
CTL_NO_CONNECTION = 1
CTL_REFUSED = 4  # a 4xx reply
CTL_FAILED = 5  # a 5xx reply
