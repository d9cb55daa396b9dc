"""Load: model specs (sample:, cifar:, torchvision:, hf:, pkg.module:factory), data specs,
preprocessing, the sample models and the embedded digits. Imports errors, runtime, contract,
formats and structured."""
