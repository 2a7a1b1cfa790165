// Preloaded into Azurite (node --require) by sandbox/azurite.py.
//
// Azurite's queue service keeps each message body as an in-memory "extent" and frees the extents
// of deleted messages in a mark-and-sweep pass once a minute. The pass removes them one by one from
// a LokiJS collection, which costs time in proportion to the collection's size, so a minute of
// queue traffic (thousands of messages) makes the pass quadratic: the event loop stops for
// seconds and every queue and table request waits (measured: 3 s after a minute at ~60 messages/s;
// 20 s with 8,000 messages). Real Azure Storage has no such pause. A pass every second keeps the
// collection small and each pass short. The pass runs to completion without yielding to I/O (the
// store is in memory), so running it more often cannot interleave with an enqueue.
"use strict";
const fs = require("fs");
const path = require("path");

const INTERVAL_MS = 1000;
try {
  // process.argv[1] is Azurite's entry script (dist/src/azurite.js, perhaps through a bin link).
  const entry = fs.realpathSync(process.argv[1]);
  const constants = require(path.join(path.dirname(entry), "queue", "utils", "constants.js"));
  if (typeof constants.DEFAULT_GC_INTERVAL_MS !== "number") {
    throw new Error("DEFAULT_GC_INTERVAL_MS not found");
  }
  constants.DEFAULT_GC_INTERVAL_MS = INTERVAL_MS;
} catch (err) {
  process.stderr.write(`presence-bridge sandbox: Azurite's queue GC interval left at its default (${err.message})\n`);
}
