"""Two processes exchanging frames through a shmfabric region.

Run: python examples/two_nodes/two_nodes.py
"""
import multiprocessing as mp

from shmfabric import Fabric


def pong(fabric_name: str) -> None:
    fab = Fabric.open(fabric_name)                    # map the region created by the parent
    node = fab.attach("pong")
    ping = node.wait_for_peer("ping")
    with node.recv_batch(timeout=5) as batch:         # zero-copy views into the packet pool
        for frame in batch:
            node.send(ping, bytes(frame.payload).upper())
    node.detach()
    fab.close()


def main() -> None:
    fab = Fabric.create("two-nodes-example", ephemeral=True)  # /dev/shm/shmfabric-two-nodes-example
    node = fab.attach("ping")
    child = mp.get_context("spawn").Process(target=pong, args=(fab.name,))
    child.start()
    peer = node.wait_for_peer("pong")
    node.send_batch(peer, [b"hello", b"fabric"])      # copied once into pool slots
    got = []
    while len(got) < 2:
        with node.recv_batch(timeout=5) as batch:
            got += [frame.tobytes() for frame in batch]
    print(got)                                        # [b'HELLO', b'FABRIC']
    child.join()
    fab.close()                                       # the ephemeral region disappears with its last node


if __name__ == "__main__":
    main()
