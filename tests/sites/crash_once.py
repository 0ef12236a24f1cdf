"""The shared client script, except that its first process dies (SIGKILL to itself, as the kernel's
OOM killer would) when it starts to train for the (N+1)-th time, N from $CRASH_ONCE_AFTER_TRAININGS
(default 0): a training-process crash, for the restart tests.

The marker file lies in the process's working directory, the site's app folder of this job, so
the process the site's FLARE client starts next trains normally.
"""

import os
import signal

from components.flare import client_train

MARKER = "crashed_once"

if not os.path.exists(MARKER):
    train_lora, trainings = client_train.train_lora, []

    def train_or_crash(*args, **kwargs):
        if len(trainings) == int(os.environ.get("CRASH_ONCE_AFTER_TRAININGS", "0")):
            open(MARKER, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        trainings.append(1)
        return train_lora(*args, **kwargs)

    client_train.train_lora = train_or_crash
client_train.main()
