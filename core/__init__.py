"""What the API and the workers share: the database and its tables, settings, stored files,
the job state machine, the broker's doorbell, logging and the disk checks. It imports the
engine and nothing of the API's or the worker's."""

__version__ = "0.1.0"
