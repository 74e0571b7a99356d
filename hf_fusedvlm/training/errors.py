"""The error `fusedvlm-train` reports as one line: an input that cannot work."""


class InvalidTrainingInput(ValueError):
    """A training input (argument, checkpoint, data) that cannot work; the message names the problem and the fix."""
