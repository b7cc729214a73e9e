"""The range of a random seed, shared by sampling (`SamplingParams.seed`, the server's `seed`) and model
initialisation (`parity export-tiny --seed`): a signed 64-bit integer, as vLLM's protocol
(``torch.iinfo(torch.long)``; ``torch.Generator.manual_seed`` accepts it)."""

SEED_MIN = -(2**63)
SEED_MAX = 2**63 - 1
