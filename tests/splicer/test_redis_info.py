"""INFO merged over servers (pure; end to end in test_redis_fanout_e2e)."""
from __future__ import annotations

from shmfabric.splicer.redis_fanout import Merge, Where, plan
from shmfabric.splicer.redis_info import format_info, human_bytes, info_reply, merge_info, parse_info, version_key

A = ("# Server\r\nredis_version:7.0.15\r\nos:Linux\r\nprocess_id:10\r\ntcp_port:7001\r\nexecutable:/usr/bin/redis-server\r\n"
     "\r\n# Clients\r\nconnected_clients:3\r\nblocked_clients:1\r\n"
     "\r\n# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\nused_memory_peak:2000000\r\n"
     "used_memory_peak_human:1.91M\r\nused_memory_peak_perc:52.43%\r\nmem_fragmentation_ratio:7.55\r\n"
     "maxmemory:100\r\nmaxmemory_policy:noeviction\r\n"
     "\r\n# Stats\r\ntotal_commands_processed:100\r\ninstantaneous_input_kbps:0.50\r\nrdb_last_save_time:1700000000\r\n"
     "\r\n# CPU\r\nused_cpu_sys:1.250000\r\n"
     "\r\n# Commandstats\r\ncmdstat_get:calls=3,usec=30,usec_per_call=10.00,rejected_calls=0,failed_calls=1\r\n"
     "\r\n# Errorstats\r\nerrorstat_ERR:count=2\r\n"
     "\r\n# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=1000,subexpiry=0\r\n")
B = ("# Server\r\nredis_version:6.2.14\r\nos:Linux\r\nprocess_id:20\r\ntcp_port:7002\r\nexecutable:/opt/redis\r\n"
     "\r\n# Clients\r\nconnected_clients:5\r\nblocked_clients:0\r\n"
     "\r\n# Memory\r\nused_memory:2097152\r\nused_memory_human:2.00M\r\nused_memory_peak:3000000\r\n"
     "used_memory_peak_human:2.86M\r\nused_memory_peak_perc:69.90%\r\nmem_fragmentation_ratio:2.10\r\n"
     "maxmemory:200\r\nmaxmemory_policy:noeviction\r\n"
     "\r\n# Stats\r\ntotal_commands_processed:50\r\ninstantaneous_input_kbps:1.25\r\nrdb_last_save_time:1700000100\r\n"
     "\r\n# CPU\r\nused_cpu_sys:0.750000\r\n"
     "\r\n# Commandstats\r\ncmdstat_get:calls=1,usec=50,usec_per_call=50.00,rejected_calls=1,failed_calls=0\r\n"
     "cmdstat_set:calls=2,usec=8,usec_per_call=4.00,rejected_calls=0,failed_calls=0\r\n"
     "\r\n# Errorstats\r\nerrorstat_ERR:count=1\r\nerrorstat_WRONGTYPE:count=4\r\n"
     "\r\n# Keyspace\r\ndb0:keys=5,expires=6,avg_ttl=2000,subexpiry=1\r\ndb3:keys=1,expires=0,avg_ttl=0,subexpiry=0\r\n")


def merged(own=None) -> dict:
    return {name: dict(fields) for name, fields in parse_info(merge_info([A, B], own or {}))}


def test_parse_and_format_round_trip() -> None:
    assert format_info(parse_info(A)) == A
    assert [name for name, _ in parse_info(A)][:3] == ["Server", "Clients", "Memory"]


def test_additive_figures_are_summed_and_the_others_are_the_largest() -> None:
    m = merged()
    assert m["Memory"]["used_memory"] == str(3 * 1048576) and m["Memory"]["used_memory_human"] == "3.00M"
    assert m["Memory"]["used_memory_peak"] == "5000000"  # peaks summed: not below the summed current figure
    assert m["Memory"]["used_memory_peak_human"] == human_bytes(5000000) == "4.77M"
    assert m["Memory"]["used_memory_peak_perc"] == "69.90%"
    assert m["Memory"]["mem_fragmentation_ratio"] == "7.55"
    assert m["Memory"]["maxmemory"] == "300"  # the servers' room together
    assert m["Memory"]["maxmemory_policy"] == "noeviction"
    assert m["Stats"]["total_commands_processed"] == "150"
    assert m["Stats"]["instantaneous_input_kbps"] == "1.75"
    assert m["Stats"]["rdb_last_save_time"] == "1700000100"
    assert m["CPU"]["used_cpu_sys"] == "2.00"
    assert m["Clients"] == {"connected_clients": "8", "blocked_clients": "1"}


def test_oldest_version_and_first_servers_text() -> None:
    m = merged()
    assert m["Server"]["redis_version"] == "6.2.14"
    assert m["Server"]["executable"] == "/usr/bin/redis-server"
    assert version_key("7.10.0") > version_key("7.9.1")  # numbers, not text


def test_keyspace_and_command_statistics() -> None:
    m = merged()
    # avg_ttl weighted by expires: (1000 * 2 + 2000 * 6) / 8
    assert m["Keyspace"] == {"db0": "keys=15,expires=8,avg_ttl=1750,subexpiry=1",
                             "db3": "keys=1,expires=0,avg_ttl=0,subexpiry=0"}
    assert m["Commandstats"]["cmdstat_get"] == "calls=4,usec=80,usec_per_call=20.00,rejected_calls=1,failed_calls=1"
    assert m["Commandstats"]["cmdstat_set"] == "calls=2,usec=8,usec_per_call=4.00,rejected_calls=0,failed_calls=0"
    assert m["Errorstats"] == {"errorstat_ERR": "count=3", "errorstat_WRONGTYPE": "count=4"}


def test_the_splicers_own_fields_are_laid_over() -> None:
    m = merged({"Server": {"process_id": "99", "tcp_port": "6400", "executable": "", "splicer_servers": "2"},
                "Clients": {"connected_clients": "1"}, "Cluster": {"x": "1"}})
    assert m["Server"]["process_id"] == "99" and m["Server"]["tcp_port"] == "6400"
    assert "executable" not in m["Server"] and list(m["Server"])[-1] == "splicer_servers"
    assert m["Clients"]["connected_clients"] == "1"
    assert "Cluster" not in m  # not asked for: the servers did not send it


def test_human_bytes_as_redis_prints_them() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 964096, 6615040, 25274466304)] == \
        ["0B", "1023B", "1.00K", "941.50K", "6.31M", "23.54G"]


def test_info_reply_keeps_the_protocols_framing() -> None:
    def own():
        return {"Clients": {"connected_clients": "1"}}

    text = "# Clients\r\nconnected_clients:2\r\n"
    resp2 = info_reply([b"$%d\r\n%s\r\n" % (len(text), text.encode())] * 2, own, lambda: b"-ERR x\r\n")
    assert resp2 == b"$32\r\n# Clients\r\nconnected_clients:1\r\n\r\n"
    resp3 = info_reply([b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text.encode())] * 2, own, lambda: b"-ERR x\r\n")
    assert resp3 == b"=36\r\ntxt:# Clients\r\nconnected_clients:1\r\n\r\n"
    assert info_reply([b":1\r\n"], own, lambda: b"-ERR x\r\n") == b"-ERR x\r\n"


def test_info_is_planned_to_every_server_in_the_pool() -> None:
    def own():
        return {}

    merge, parts = plan(b"INFO", [b"INFO", b"keyspace"], [0, 2], b"payload", 7, range(3), own)
    assert merge == Merge.INFO and [p[0] for p in parts] == [0, 2]
    assert all(isinstance(p[3], Where) and p[3].extra is own for p in parts)
