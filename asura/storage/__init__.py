"""Where a run's files live: a local directory or a gs:// prefix (the layer every path goes through).

    paths   to_path (the one constructor for run paths), write_whole, files_under, move_tree
    gcs     object operations with generation preconditions (create-if-absent, compare-and-swap)
    lock    the workdir lock: an flock locally, an object with a heartbeat on gs://
    records metrics records: one appended file locally, whole objects on gs:// (no append there)

Importing this package sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false unless it is set: gcsfs's
experimental hierarchical-namespace probe otherwise calls a gRPC control API for every bucket it
meets (a minute of retries against an emulator, a warning without credentials); it must be set
before gcsfs is first imported.
"""

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
