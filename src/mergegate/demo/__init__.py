"""`mergegate demo`: the release workflow on the shipped demo models (`release`), the summary's sections past one
merged model (`sections`: a mixture of experts, a cascade at the gateway, a GGUF export), and the generated sample
checkpoints the tests and benchmarks build (`samples`)."""

from .release import METHODS, RANKING, find_demo_folder, run_demo

__all__ = ["METHODS", "RANKING", "find_demo_folder", "run_demo"]
