"""What `baton status` prints of the router's StatusResponse (standard library and protobuf only:
the command answers at once)."""
from __future__ import annotations


def print_status(st, as_json: bool) -> None:
    """The router's StatusResponse as `baton status` prints it: a summary and a table of workers, or JSON."""
    if as_json:
        import json
        d = status_dict(st)
        for w, info in zip(d["workers"], st.workers):
            w["kv_usage_percent"] = kv_usage_percent(info)
        print(json.dumps(d))
        return
    s = st.stats
    batch = f", {st.max_batch} rows per decode batch" if st.max_batch else ""   # 0: no worker reported it
    print(f"model {st.model} ({st.topology}): {s.running} running, {s.waiting} waiting (queue limit {st.max_queue}"
          f"{batch}); completed {s.completed}, failed {s.failed}, cancelled {s.cancelled}")
    print(f"{'role':9} {'id':18} {'pid':>7} {'address':22} {'alive':5} {'load':>4} {'batch':>5} {'width':>5} "
          f"{'kv used':>7} {'prefix hits':>11} {'kv transport':12}")
    for w in st.workers:
        kv = f"{kv_usage_percent(w):.1f}%" if w.role != "prefill" else "-"
        hits = (f"{100 * w.prefix_cache_hit_tokens / w.prefix_cache_queried_tokens:.1f}%"
                if w.prefix_cache_queried_tokens else "-")
        print(f"{w.role:9} {w.worker_id:18} {w.pid:>7} {w.address:22} {str(w.alive):5} {w.load:>4} "
              f"{w.running:>5} {w.batch_width:>5} {kv:>7} {hits:>11} {w.kv_transport or '-':12}")
    print(api_servers_line(st.api_servers))


def api_servers_line(servers) -> str:
    """How many processes serve the OpenAI HTTP API, where, and their pids."""
    if not servers:
        return "API servers: none (no --http-port)"
    alive = [a for a in servers if a.alive]
    where = "in baton up's process" if len(servers) == 1 and servers[0].index == 0 else "sharing one socket"
    pids = ", ".join(f"{a.pid}" + ("" if a.alive else " (restarting)") + (f" ({a.restarts} restarts)" if a.restarts
                                                                         else "") for a in servers)
    return f"API servers: {len(alive)} of {len(servers)} running on http://{servers[0].address} ({where}; pids {pids})"


def kv_usage_percent(w) -> float:
    """A worker's K/V bytes of live rows over the bytes its batch cache holds, in percent (0 when none)."""
    return round(100 * w.kv_used_bytes / w.kv_cache_bytes, 1) if w.kv_cache_bytes else 0.0


def status_dict(msg) -> dict:
    """A message as JSON-ready dict with every field, 64-bit integers as numbers (protobuf's JSON
    mapping writes them as strings)."""
    from google.protobuf.json_format import MessageToDict
    return _int64_to_int(msg.DESCRIPTOR, MessageToDict(msg, preserving_proto_field_name=True,
                                                       always_print_fields_with_no_presence=True))


def _int64_to_int(descriptor, d: dict) -> dict:
    from google.protobuf.descriptor import FieldDescriptor as F
    wide = (F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_SINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64)
    for f in descriptor.fields:
        if f.name not in d:
            continue
        v = d[f.name]
        if f.message_type is not None and not f.message_type.GetOptions().map_entry:
            d[f.name] = [_int64_to_int(f.message_type, x) for x in v] if isinstance(v, list) \
                else _int64_to_int(f.message_type, v)
        elif f.type in wide:
            d[f.name] = [int(x) for x in v] if isinstance(v, list) else int(v)
    return d
