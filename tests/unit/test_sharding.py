from cacflow.manifest import VisitEntry
from cacflow.sharding import existing_shards, plan_shards, read_plan_keys, write_plan


def entries(n, start=0):
    return [VisitEntry(f"P{i:03d}", "V1", f"/data/{i}") for i in range(start, start + n)]


def test_shards_are_filled_in_order(tmp_path):
    plan = plan_shards(entries(5), tmp_path, shard_size=2)
    assert [shard for shard, _ in plan] == ["s000001", "s000001", "s000002", "s000002", "s000003"]
    assert {k: len(v) for k, v in existing_shards(tmp_path).items()} == {"s000001": 2, "s000002": 2, "s000003": 1}


def test_new_visits_go_to_new_shards_and_old_members_files_are_untouched(tmp_path):
    plan_shards(entries(3), tmp_path, shard_size=2)
    members = tmp_path / "s000002" / "members.tsv"
    before = (members.read_text(), members.stat().st_mtime_ns)
    plan = plan_shards(entries(5), tmp_path, shard_size=2)
    assert (members.read_text(), members.stat().st_mtime_ns) == before  # the partial shard is not refilled
    assert [shard for shard, _ in plan][3:] == ["s000003", "s000003"]


def test_plan_lists_only_current_manifest_rows(tmp_path):
    plan_shards(entries(4), tmp_path, shard_size=2)
    plan = plan_shards(entries(2, start=2), tmp_path, shard_size=2)  # P000 and P001 left the manifest
    write_plan(plan, tmp_path / "plan.tsv")
    assert read_plan_keys(tmp_path / "plan.tsv") == {("P002", "V1"), ("P003", "V1")}
