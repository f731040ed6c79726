"""hub_backdoor: find and remove backdoors in image classifiers from the Hugging Face Hub."""

__version__ = "0.1.0"
