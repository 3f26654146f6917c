from torchslim.measure.plots import pareto_front, plot_accuracy_vs_size


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.99), (50, 0.98), (60, 0.97), (25, 0.90), (30, 0.95), (200, 0.99)]
    assert pareto_front(points) == [3, 4, 1, 0]


def test_plot_is_a_png_written_atomically(tmp_path):
    path = tmp_path / "plot.png"
    plot_accuracy_vs_size(["fp32", "4-bit"], [1_700_000, 230_000], [0.99, 0.985], path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_labels_of_points_close_together_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchslim.measure.plots import _place_labels

    figure, axes = plt.subplots(figsize=(6, 4))
    xs, ys = [200.0, 200.1, 199.9, 1700.0], [99.17, 99.10, 99.15, 99.17]  # three variants of one size and accuracy
    axes.scatter(xs, ys)
    axes.set_xscale("log")
    texts = _place_labels(figure, axes, ["lenet5-int4", "lenet5-int4-floor", "lenet5-int4-g", "lenet5"], xs, ys)
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(figure)
