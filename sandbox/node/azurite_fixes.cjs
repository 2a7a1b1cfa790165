// Preloaded into Azurite (node --require) by sandbox/azurite.py. Four costs of Azurite's
// in-memory stores that Azure Storage does not have, and that would otherwise set the pace of
// every benchmark and soak run. Each fix checks that the code it changes is still there and
// otherwise leaves Azurite as it is, with a line on stderr. None changes what a request returns
// (tests/sandbox/test_azurite.py).
//
// 1. The queue sweep. Azurite keeps each message body as an in-memory "extent" and frees the
//    extents of deleted messages in a mark-and-sweep pass once a minute. The pass removes them one
//    by one from a LokiJS collection, which costs time in proportion to the collection's size, so a
//    minute of queue traffic (thousands of messages) makes the pass quadratic: the event loop stops
//    for seconds and every queue and table request waits (measured: 3 s after a minute at ~60
//    messages/s; 20 s with 8,000 messages). A pass every second keeps the collection small and each
//    pass short. The pass runs to completion without yielding to I/O (the store is in memory), so
//    running it more often cannot interleave with an enqueue.
//
// 2. Dequeue in proportion to every message of the account. Get, delete and update first clear
//    the queue's expired messages with a query that leads with `accountName` (indexed, but the same
//    for every message), so each one scans every message of every queue; get and peek then scan
//    them all again to find the queue's visible ones. With 3,000 messages waiting, a receive and a
//    delete cost ~15 ms of the single event loop per message (30 ms at 6,000, 2.5 ms with none),
//    and a burst's backlog throttled all storage. Azure dequeues in constant time (2,000 messages/s
//    per queue is its scalability target). Here expired messages are cleared at most once a second
//    per queue, and get and peek look the queue's messages up through the `queueName` index and
//    leave out expired ones themselves, so what they return is unchanged.
//
// 3. Entity point reads in proportion to the table. Every read, insert, update, merge and delete
//    of one entity looks it up with `findOne({RowKey, PartitionKey})`; LokiJS answers the first
//    key from its index and scans the rest, and a table whose RowKey is the same in every row (our
//    links: one row per partition) is scanned whole. In the 10,000-person burst that was 82 % of
//    Azurite's time (CPU profile of the converge phase). Azure Tables answer a point query by its
//    keys directly. Here the lookup uses whichever key's index narrows it more.
//
// 4. Removals that re-sort whole collections. LokiJS removes through `findAndRemove` or an array
//    as a batch, and a batch removal from a collection with indexes rebuilds (sorts) every index
//    afterwards, even for one document or none. The sweep frees each message body with its own
//    `findAndRemove({id})`, and clearing expired messages removes an array, usually empty: with a
//    backlog of a few thousand messages that was 37 % of Azurite's time (CPU profile of a burst
//    whose intake ran ahead of its workers), and enough to make it the bottleneck. Here each
//    document goes through LokiJS's single-document remove, which updates the indexes in place.
"use strict";
const fs = require("fs");
const path = require("path");

const GC_INTERVAL_MS = 1000;
const CLEAR_EXPIRED_INTERVAL_MS = 1000;

function warn(what, err) {
  process.stderr.write(`presence-bridge sandbox: ${what} (${err.message})\n`);
}

// Azurite's compiled sources: process.argv[1] is its entry script (dist/src/azurite.js, perhaps
// through a bin link).
function azuriteModule(...parts) {
  return require(path.join(path.dirname(fs.realpathSync(process.argv[1])), ...parts));
}

// One entity by its two keys, from the narrower of the two key indexes; anything else as LokiJS does.
function findOneByKeys(query) {
  const inherited = Object.getPrototypeOf(this).findOne;
  if (!query || typeof query.PartitionKey !== "string" || typeof query.RowKey !== "string"
      || Object.keys(query).length !== 2 || this.cloneObjects
      || !this.binaryIndices.PartitionKey || !this.binaryIndices.RowKey) {
    return inherited.call(this, query);
  }
  let best = null;
  for (const key of ["PartitionKey", "RowKey"]) {
    this.ensureIndex(key); // rebuilds only an index marked dirty
    const [first, last] = this.calculateRange("$eq", key, query[key]);
    if (best === null || last - first < best.last - best.first) best = { key, first, last };
  }
  const positions = this.binaryIndices[best.key].values;
  for (let i = best.first; i <= best.last; i++) {
    const doc = this.data[positions[i]];
    if (doc.PartitionKey === query.PartitionKey && doc.RowKey === query.RowKey) return doc;
  }
  return null;
}

function patchPointReads(proto) {
  if (typeof proto.getEntityCollection !== "function") {
    throw new Error("LokiTableMetadataStore.getEntityCollection not found");
  }
  const getEntityCollection = proto.getEntityCollection;
  proto.getEntityCollection = function (...args) {
    const coll = getEntityCollection.apply(this, args);
    if (coll && typeof coll.calculateRange === "function" && !Object.prototype.hasOwnProperty.call(coll, "findOne")) {
      coll.findOne = findOneByKeys;
    }
    return coll;
  };
}

// LokiJS's single-document remove: indexes updated in place, not rebuilt.
function removeEach(coll, docs) {
  for (const doc of docs) coll.remove(doc);
}

function patchExtentDeletes(proto) {
  if (typeof proto.deleteExtent !== "function") throw new Error("LokiExtentMetadataStore.deleteExtent not found");
  proto.deleteExtent = async function (extentId) {
    const coll = this.db.getCollection(this.EXTENTS_COLLECTION);
    removeEach(coll, coll.find({ id: extentId }));
  };
}

function patchDequeue(proto) {
  for (const name of ["clearExpiredMessages", "getMessages", "peekMessages", "checkQueueExist", "messageCopy"]) {
    if (typeof proto[name] !== "function") throw new Error(`LokiQueueMetadataStore.${name} not found`);
  }
  const lastCleared = new WeakMap(); // store -> Map("account\nqueue" -> ms)

  proto.clearExpiredMessages = async function (account, queue, context) {
    this.checkQueueExist(account, queue, context);
    let cleared = lastCleared.get(this);
    if (!cleared) lastCleared.set(this, (cleared = new Map()));
    const key = `${account}\n${queue}`;
    const now = Date.now();
    if (now - (cleared.get(key) || 0) < CLEAR_EXPIRED_INTERVAL_MS) return;
    cleared.set(key, now);
    // The query Azurite's own clear makes, answered from the queueName index; what it finds is
    // removed one by one (fix 4).
    const coll = this.db.getCollection(this.MESSAGES_COLLECTION);
    removeEach(coll, coll.chain().find({ queueName: queue })
      .find({ accountName: account, expirationTime: { $lte: now } }).data());
  };

  // The queue's visible, unexpired messages, oldest first: the original query and order, but the
  // first filter is answered from the queueName index.
  function visible(store, account, queue, queryTime, count) {
    return store.db.getCollection(store.MESSAGES_COLLECTION)
      .chain()
      .find({ queueName: queue })
      .find({ accountName: account, timeNextVisible: { $lte: queryTime }, expirationTime: { $gt: queryTime } })
      .compoundsort([["timeNextVisible", false], ["$loki", false]])
      .limit(count)
      .data();
  }

  // What the caller gets: copies with timeNextVisible as a Date (the store keeps milliseconds).
  function copies(store, docs) {
    return docs.map((doc) => {
      const visibleAt = doc.timeNextVisible;
      doc.timeNextVisible = new Date(Number(visibleAt));
      const copy = store.messageCopy(doc);
      doc.timeNextVisible = visibleAt;
      return copy;
    });
  }

  proto.peekMessages = async function (account, queue, numOfMessages, queryDate, context) {
    this.checkQueueExist(account, queue, context);
    this.clearExpiredMessages(account, queue, context);
    const queryTime = queryDate ? queryDate.getTime() : Date.now();
    return copies(this, visible(this, account, queue, queryTime, numOfMessages === undefined ? 1 : numOfMessages));
  };

  proto.getMessages = async function (account, queue, timeNextVisible, popReceipt, numOfMessages, queryDate, context) {
    this.checkQueueExist(account, queue, context);
    this.clearExpiredMessages(account, queue, context);
    const coll = this.db.getCollection(this.MESSAGES_COLLECTION);
    const queryTime = queryDate ? queryDate.getTime() : Date.now();
    const count = numOfMessages === undefined || numOfMessages < 1 ? 1 : numOfMessages;
    const docs = visible(this, account, queue, queryTime, count);
    const visibleAt = timeNextVisible.getTime();
    for (const doc of docs) {
      doc.timeNextVisible = visibleAt;
      doc.popReceipt = popReceipt;
      doc.dequeueCount = Number(doc.dequeueCount) + 1;
    }
    coll.update(docs);
    return copies(this, docs);
  };
}

// A fix that cannot find what it changes leaves Azurite as it is and says so.
function apply(unapplied, fix) {
  try {
    fix();
  } catch (err) {
    warn(unapplied, err);
  }
}

function storePrototype(name, ...parts) {
  const store = azuriteModule(...parts).default;
  if (!store || !store.prototype) throw new Error(`${name} not found`);
  return store.prototype;
}

apply("Azurite's queue GC interval left at its default", () => {
  const constants = azuriteModule("queue", "utils", "constants.js");
  if (typeof constants.DEFAULT_GC_INTERVAL_MS !== "number") throw new Error("DEFAULT_GC_INTERVAL_MS not found");
  constants.DEFAULT_GC_INTERVAL_MS = GC_INTERVAL_MS;
});
apply("Azurite's dequeue left as it is", () => patchDequeue(
  storePrototype("LokiQueueMetadataStore", "queue", "persistence", "LokiQueueMetadataStore.js")));
apply("Azurite's entity lookups left as they are", () => patchPointReads(
  storePrototype("LokiTableMetadataStore", "table", "persistence", "LokiTableMetadataStore.js")));
apply("Azurite's message body removal left as it is", () => patchExtentDeletes(
  storePrototype("LokiExtentMetadataStore", "common", "persistence", "LokiExtentMetadataStore.js")));
