"""The generative model p(x|z)p(z) and the amortised variational family q(z|x)."""

from streamvi.model.base import LatentFamily, Likelihood
from streamvi.model.latents import DiagonalGaussian
from streamvi.model.likelihoods import BernoulliLikelihood, GaussianLikelihood
from streamvi.model.vae import VAE, build_vae

__all__ = [
    "VAE",
    "BernoulliLikelihood",
    "DiagonalGaussian",
    "GaussianLikelihood",
    "LatentFamily",
    "Likelihood",
    "build_vae",
]
