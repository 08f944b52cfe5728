"""Why a tile gets its prediction: SmoothGrad saliency, LIME over nuclei, latent space."""
