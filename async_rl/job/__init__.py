"""The asynchronous training job: placement on Ray, the controller, the role loops, the run folder."""
