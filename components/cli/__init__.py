"""The ``flare-lora`` command and the job command lines (``nvflare_jobs/<job>/job.py`` call these)."""
