"""Old home of the job callables, kept so that jobs pickled before they moved still load.

submitit pickles the callable by module path (``sdcluster.cluster.callables.TrainJob``); a job submitted
before the move and requeued after it unpickles through this module. New code imports
:mod:`sdcluster.runtime.callables`.
"""

from sdcluster.runtime.callables import GenerateJob, Outcome, TrainJob, run_job, setup_logging

__all__ = ["GenerateJob", "Outcome", "TrainJob", "run_job", "setup_logging"]
