"""streamvi: a variational autoencoder learned online, by stochastic-gradient VI, from a Kafka stream."""

from streamvi.errors import ConfigError, StreamVIError

__version__ = "0.1.0"

__all__ = ["ConfigError", "StreamVIError", "__version__"]
