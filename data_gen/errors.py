"""The one error type data_gen raises for bad input; the CLI prints it as one line and exits non-zero."""


class DataGenError(Exception):
    """A problem with the user's input (persona folder, config, templates, general data), worded for a person."""
