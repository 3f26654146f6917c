"""Multi-stage jobs: the demo now; recipes and the budget planner build on it."""
