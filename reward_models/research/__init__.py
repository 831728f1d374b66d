"""Research heads: taste models beyond the mean and rater heads, with their training and
evaluation. The trainer uses the latent head (`taste.source=latents`); the rest are measured in
benchmarks/ and README.

    latent        VPL-style latent-taste head: an encoder maps a few ratings to a posterior over z
    latent_fit    its ELBO training over users
    latent_eval   few-shot evaluation and diagnostics (is z used?)
    latent_query  which ratings to ask a new user for (expected information gain)
    mdn           rater-level mixture-density head
    mixture       EM over raters: a mixture of heads, one per taste

Importing this package registers the `latent` and `mdn` head kinds with `reward_models.heads`,
so `build_head` and `load_head` read them.
"""

from reward_models.research import latent, mdn  # noqa: F401  (register their head kinds)
