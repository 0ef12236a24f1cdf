"""The shared client script, except that it dies (SIGKILL to itself, as the kernel's OOM killer
would) when it starts to train: a training-process crash, for the restart tests.

$CRASH_AFTER_TRAININGS (default 0): trainings a process completes before it dies.
$CRASH_EVERY_PROCESS (default unset): every process dies so; otherwise only the site's first, and
the process the site's FLARE client starts next trains normally (the marker file lies in the
process's working directory, the site's app folder of this job).
"""

import os
import signal

from flare_lora.components.flare import client_train

MARKER = "crashed_once"

if os.environ.get("CRASH_EVERY_PROCESS") or not os.path.exists(MARKER):
    train_lora, trainings = client_train.train_lora, []

    def train_or_crash(*args, **kwargs):
        if len(trainings) == int(os.environ.get("CRASH_AFTER_TRAININGS", "0")):
            open(MARKER, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        trainings.append(1)
        return train_lora(*args, **kwargs)

    client_train.train_lora = train_or_crash
client_train.main()
