"""What several jobs share, between the jobs and the library: the training driver and its worker
function (:mod:`genmem.runs.training`), an evaluation logged into a run
(:mod:`genmem.runs.evaluations`), a sweep's trials as curves (:mod:`genmem.runs.curves`) and how a
run was started (:mod:`genmem.runs.context`). Jobs import it; it imports no job."""
