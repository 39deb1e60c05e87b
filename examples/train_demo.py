"""The mldash demo: a small training loop that saves checkpoints, its config and a loss plot, then
shows them synced — on the embedded default (a local store directory and a SQLite catalog under
$XDG_DATA_HOME/mldash), with no service to set up.

    python examples/train_demo.py [--epochs 5]

The saves return as soon as the bytes are in the local spool; a detached `mldash-syncd`, started
by the first save, uploads them, verifies their SHA256 and records them in the catalog.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from mldash import Experiment
from mldash.redact import redact_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--prefix", default=f"demo/regression/run-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(512, 16)
    y = x @ torch.randn(16, 1) + 0.1 * torch.randn(512, 1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    config = {"epochs": args.epochs, "lr": 1e-2, "hidden": 64}

    with Experiment(prefix=args.prefix).run as exp:
        exp.files("configs").save_json(config, to="config.json")
        losses, stalls = [], []
        for epoch in range(1, args.epochs + 1):
            for _ in range(50):
                optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            started = time.perf_counter()
            exp.files("checkpoints").save_torch(model, to=f"epoch-{epoch}.pt", tags=["checkpoint"],
                                                metadata={"epoch": epoch, "loss": losses[-1]})
            stalls.append(time.perf_counter() - started)
            print(f"epoch {epoch}: loss {losses[-1]:.4f}  (save_torch returned in {stalls[-1] * 1000:.1f} ms)")

        fig, ax = plt.subplots()
        ax.plot(range(1, len(losses) + 1), losses, marker="o")
        ax.set(xlabel="epoch", ylabel="MSE loss", title="training loss")
        exp.files("plots").save_fig(fig, to="loss.png", dpi=100)

        print("\nwaiting for mldash-syncd to upload, verify and commit everything…")
        started = time.perf_counter()
        statuses = exp.flush(timeout=120)
        print(f"all {len(statuses)} files committed {time.perf_counter() - started:.2f} s after the last save\n")

        print(f"{'status':<10} {'size':>9}  {'sha256':<14} path")
        for entry in exp.files().list():
            print(f"{entry['status']:<10} {entry['sizeBytes']:>9}  {entry['checksum'][:12]}…  "
                  f"{entry['path'].rstrip('/')}/{entry['filename']}")
        print(f"\nexperiment {exp.path}: run `.venv/bin/mldash-syncd status` to see the spool; the files are in "
              f"the store {exp.settings.store}, their records in the catalog {redact_uri(exp.settings.catalog)}.")


if __name__ == "__main__":
    main()
