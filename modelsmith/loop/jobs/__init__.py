"""Jobs: long work an RPC call starts and returns at once, and the job.* methods."""
