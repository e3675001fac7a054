"""hybridserve: an inference server for recurrent and hybrid language models."""

__version__ = "0.1.0"
