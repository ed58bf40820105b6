"""Jobs: one module per job and the registry (``genmem.jobs.registry``). The only package where
the library, Ray and MLflow meet; see ``genmem.jobs.base`` for what a job declares."""
