"""The generative model p(x|z)p(z) and the amortised variational family q(z|x)."""

from streamvi.model.base import LatentFamily, LatentSample, Likelihood
from streamvi.model.latents import DiagonalGaussian, GumbelSoftmax
from streamvi.model.likelihoods import (
    BernoulliLikelihood,
    BinomialLikelihood,
    GaussianLikelihood,
    PoissonLikelihood,
)
from streamvi.model.vae import VAE, build_vae

__all__ = [
    "VAE",
    "BernoulliLikelihood",
    "BinomialLikelihood",
    "DiagonalGaussian",
    "GaussianLikelihood",
    "GumbelSoftmax",
    "LatentFamily",
    "LatentSample",
    "Likelihood",
    "PoissonLikelihood",
    "build_vae",
]
