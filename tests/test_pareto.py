from kcpt.analysis.pareto import pareto_front, pareto_records


def test_front_keeps_non_dominated_points_only():
    pts = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (5.0, 1.0), (2.0, 2.0), (float("nan"), 0.0)]
    assert pareto_front(pts) == [0, 1, 3, 4]


def test_records_skip_missing_keys():
    recs = [{"raw": 1.0, "exam": 2.0}, {"raw": 0.5}, {"raw": 2.0, "exam": 1.0}, {"raw": 2.0, "exam": 3.0}]
    assert pareto_records(recs, ["raw", "exam"]) == [recs[0], recs[2]]
