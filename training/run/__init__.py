"""A run's lifecycle, one owner for every way of starting one (the Train node, the CLI, the tests).

* `launch`: the argument list (python or torchrun, never a shell), the child process in its own session, polite stop,
  and the final status once the child has gone (`settle_status`);
* `events`: what a run writes while it trains (events.jsonl, status.json, summary.json) and how a follower reads it;
* `failure`: the traceback and one-line message a failing rank leaves, and the launcher's verdict on a dead rank;
* `session`: what an engine entry point does around training (hold the folder, clear old errors, record a failure).

The engine (`training.engine`) only computes; it reports through `events` and `failure`. Nothing here imports the
engine or ComfyUI.
"""
