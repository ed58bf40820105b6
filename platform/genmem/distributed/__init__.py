"""Execution on Ray, with no tracking and no method in it: the Ray Train driver around a worker
function (``train``), maps over Ray tasks (``tasks``, ``sampling``), Tune wiring (``tune``),
cluster checks (``cluster``), the Accelerate engine (``engine``) and job submission (``submit``).
The library below it runs without a cluster; the jobs above it add MLflow."""
