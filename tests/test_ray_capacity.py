"""The pool-versus-cluster check behind `--ray` (runners/ray_capacity.py), on nodes as `ray.nodes()` lists them."""
from extractor.runners.ray_capacity import GiB, Demand, Node, check, fits

READ = Demand(cpus=0.25)


def nodes(*specs):
    return [Node.from_ray({"NodeID": f"{i:02d}" * 28, "NodeManagerAddress": f"10.0.0.{i}", "Alive": True,
                           "Resources": res}) for i, res in enumerate(specs)]


def test_cpu_workers_leave_room_for_a_read_task_on_the_driver_node():
    two = nodes({"CPU": 1.0, "memory": 8 * GiB}, {"CPU": 1.0, "memory": 8 * GiB})
    worker = Demand(cpus=0.5, memory=GiB)
    assert fits(two, 2, worker, READ, two[0].node_id)
    assert not fits(two, 3, worker, READ, two[0].node_id)  # the driver's node may get two: no read slot left
    assert fits(two, 3, worker, READ, None)  # reads anywhere (an object-store corpus): the other node has room
    message = check(two, 4, worker, READ, two[0].node_id)
    assert "--ray-workers 4 cannot run" in message and "0.5 CPU, 1.0 GiB memory" in message
    assert "10.0.0.1" in message and "1 CPU, 0 GPU, 8.0 GiB" in message and "--ray-workers 2 or fewer" in message


def test_memory_and_gpus_are_counted_per_node():
    big = Demand(cpus=0.5, memory=10 * GiB)
    two = nodes({"CPU": 8.0, "memory": 16 * GiB}, {"CPU": 8.0, "memory": 16 * GiB})
    assert fits(two, 2, big, READ, None) and not fits(two, 3, big, READ, None)  # 16 GiB holds one 10 GiB worker
    assert "--ray-workers 2 or fewer" in check(two, 3, big, READ, None)
    gpu = Demand(cpus=1, gpus=1)
    mixed = nodes({"CPU": 4.0, "GPU": 2.0, "memory": GiB}, {"CPU": 4.0, "memory": GiB})
    assert fits(mixed, 2, gpu, READ, None) and "--ray-workers 2 or fewer" in check(mixed, 3, gpu, READ, None)
    assert "has no GPUs" in check(nodes({"CPU": 4.0, "memory": GiB}), 1, gpu, READ, None)
    assert "add nodes" in check(nodes({"CPU": 0.25, "memory": GiB}), 1, Demand(cpus=0.5), READ, None)
