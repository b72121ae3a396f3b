"""Files for the Batch API (`/v1/files`): where their bytes live (`storage`), how an
upload is received (`upload`), what a batch input line must look like (`batch_lines`),
and the pruning of expired files (`prune`). Their metadata is in `app.store.files`."""
