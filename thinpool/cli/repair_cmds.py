"""``thinpool repair``: salvage a pool whose metadata is damaged (thin_repair's job)."""

from __future__ import annotations

import click

from .common import abspath, emit, json_option, pool_argument

SECTION = "Repair"


@click.command("repair")
@pool_argument
@click.option("-o", "--output", "output", metavar="OUT", type=click.Path(path_type=str), default=None,
              help="Write the salvaged pool to the new directory OUT (data blocks are copied) and leave POOL "
                   "untouched.  Without it, POOL is repaired in place (the damaged metadata is kept as "
                   "metadata.damaged).")
@json_option
def repair_cmd(pool: str, output: str | None, as_json: bool) -> None:
    """Salvage what is consistent in POOL's metadata and report what was lost.

    Every metadata page is checked against its checksum; a damaged page loses only what it holds
    (a leaf's mappings, a device, the names...).  When the newest commit is unreadable the previous
    one is used.  The report lists the devices and mappings dropped; exit status 0 when the pool
    was repaired (even with losses), 1 when nothing could be salvaged or the pool is in use.
    """
    from thinpool.errors import FailedPrecondition
    from thinpool.repair import repair

    from thinpool.control.client import connect
    sock = connect(pool)
    if sock is not None:
        sock.close()
        raise FailedPrecondition(f"pool {abspath(pool)} is being served: stop the server before repairing it")
    report = repair(abspath(pool), abspath(output) if output else None)
    emit(report.as_dict(), as_json, lambda r: report.summary())


COMMANDS: list[click.Command] = [repair_cmd]
