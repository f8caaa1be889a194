"""curves.png: training loss and held-out kNN top-1 against epoch."""


def plot_curves(history, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in history if r["loss"] is not None]
    evaluated = [r for r in history if r["knn_top1"] is not None]
    figure, (loss_axis, knn_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_axis.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title=f"{title}: loss")
    if evaluated:
        knn_axis.plot([r["epoch"] for r in evaluated], [r["knn_top1"] for r in evaluated], marker="o",
                      color="tab:green")
        knn_axis.axhline(evaluated[0]["knn_top1"], color="gray", linestyle=":", label="epoch 0 (random init)")
        knn_axis.legend(loc="lower right")
    knn_axis.set(xlabel="epoch", ylabel="kNN top-1 (held-out)", title=f"{title}: weighted kNN")
    for axis in (loss_axis, knn_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)
