"""How a flow on image features separates OOD sets as it trains: likelihood AUROC after each epoch, beside a
full-covariance Gaussian fitted to the same training features.

    FLOWCORE_DATA_DIR=... python benchmarks/feature_flow_epochs.py configs/cifar10_embeddings.json --epochs 8

Trains the config's model on its dataset's cached features (extracted once, as ``flowcore train`` does) with the
config's optimizer, batch size and learning rate held constant (no schedule), and after each epoch prints the
test-set negative log-likelihood per feature and the likelihood AUROC against each OOD set of the config (first
2,000 images of each; CelebA's 1,000). The Gaussian line is the baseline a flow starts to improve on: the
in-distribution test features against each OOD set under N(mean, covariance + 1e-3 I) of the training features.
The shipped checkpoints are not changed.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import flowcore
from flowcore.data.datasets import DatasetNotFound, set_label
from flowcore.ood.scores import auroc
from flowcore.ood.vectors import dataset_features
from flowcore.training.train import load_train_config, optimizer_for

OOD_IMAGES = 2000


def gaussian_log_density(train: np.ndarray, reg: float = 1e-3):
    mean = train.mean(axis=0)
    centred = train - mean
    precision = np.linalg.inv(centred.T @ centred / len(train) + reg * np.eye(train.shape[1]))
    return lambda x: -0.5 * np.einsum("ij,jk,ik->i", x - mean, precision, x - mean)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--epochs", type=int, default=8)
    args = p.parse_args()
    cfg = load_train_config(args.config)
    torch.set_num_threads(cfg.threads or 1)
    train = dataset_features(cfg.dataset, "train", progress=True)
    test = dataset_features(cfg.dataset, "test", limit=5000, progress=True)
    ood = {}
    for name in cfg.ood:
        try:
            ood[set_label(name)] = dataset_features(name, "test", limit=OOD_IMAGES, progress=True)
        except DatasetNotFound as e:
            print(f"{set_label(name)}: skipped ({e})")
    gauss = gaussian_log_density(train.astype(np.float64))
    g_test = gauss(test.astype(np.float64))
    print("Gaussian baseline: " + ", ".join(f"{k} {100 * auroc(g_test, gauss(v.astype(np.float64))):.1f}"
                                            for k, v in ood.items()))
    torch.manual_seed(cfg.seed)
    model = flowcore.build(cfg.model)
    x_train = torch.from_numpy(train)
    model.standardize.fit(x_train)
    opt = optimizer_for(cfg, model.parameters())

    def report(label: str) -> None:
        model.eval()
        with torch.no_grad():
            def ll(x: np.ndarray) -> np.ndarray:
                return model.log_prob(torch.from_numpy(x)).double().numpy()

            t = ll(test)
            parts = ", ".join(f"{k} {100 * auroc(t, ll(v)):.1f}" for k, v in ood.items())
        print(f"{label}: test nll {-t.mean() / cfg.model.dim:.4f} nats/feature; likelihood AUROC % {parts}",
              flush=True)
        model.train()

    report("initial")
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        for i in range(len(x_train) // cfg.batch_size):
            batch = x_train[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            loss = -model.log_prob(batch).mean() / cfg.model.dim
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
        report(f"epoch {epoch + 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
