from torchslim.measure.plots import pareto_front, plot_accuracy_vs_size


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.99), (50, 0.98), (60, 0.97), (25, 0.90), (30, 0.95), (200, 0.99)]
    assert pareto_front(points) == [3, 4, 1, 0]


def test_plot_is_a_png_written_atomically(tmp_path):
    path = tmp_path / "plot.png"
    plot_accuracy_vs_size(["fp32", "4-bit"], [1_700_000, 230_000], [0.99, 0.985], path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
