#!/usr/bin/env python3
"""PTU files from an independent writer: qkd-timetag's reader against ptufile.

Run by .ci/ptu-interop.sh, which installs ptufile (Christoph Gohlke's PicoQuant file library,
PyPI) and numpy into a throw-away virtualenv and builds the Rust example `ptu_dump`:

    python tests/ptu_interop.py --dump target/debug/examples/ptu_dump [--workdir DIR] [--seed N]

1. Writes T3 image-mode PTU files with ptufile's writer (`ptufile.imwrite`) from random TCSPC
   histograms (several channels, several frames; pixel times long enough that the sync counter
   wraps, that is overflow records, many with an overflow count above 1). The writer emits two
   record formats: PicoHarp T3 (0x00010303) and GenericT3 (MultiHarp, 0x00010307). The
   GenericT3 file is also copied with only the header's TTResultFormat_TTTRRecType changed to
   the other formats of the same record layout: HydraHarp V2 T3, TimeHarp 260 N and P T3, and
   HydraHarp V1 T3 (whose overflow records count one wrap each, whatever their count field
   holds: the same bytes mean other times, and both decoders must agree on which).
2. Decodes every file with ptufile's own decoder (`PtuFile.decode_records`, compiled code that
   is not ours) and turns its records into the expected stream:
   - a photon (channel >= 0) is `tag <channel + 1> <time_ps>`: ptufile numbers input channels
     from 0 for every format; qkd-timetag reserves 0 for the sync and numbers inputs from 1;
   - a marker (channel < 0, marker bits > 0; the writer's line start 1, line stop 2 and frame
     change 4) is `marker <bits> <time_ps>`;
   - an overflow (channel < 0, marker 0) is no record: both sides fold it into the time.
   time_ps = round(time * (G * 1e12) + dtime * (R * 1e12)) for photons and
   round(time * (G * 1e12)) for markers, where `time` is ptufile's decoded global time (the
   record's nsync plus all overflows, in sync periods), `dtime` its decoded TCSPC bin,
   G = MeasDesc_GlobalResolution and R = MeasDesc_Resolution from the header (as read by
   ptufile), in IEEE double arithmetic, rounded half away from zero: the formula qkd-timetag's
   reader documents.
3. Runs `ptu_dump FILE` and compares its header lines (record type, resolutions, record count,
   header length) and its records, one for one and in order, with the expected stream.
4. Malformed copies (bad magic; truncated inside the header; truncated inside a record and at a
   record boundary before the announced count; an unknown record type patched into
   TTResultFormat_TTTRRecType): `ptu_dump` must exit non-zero with a message naming the file,
   the expected byte offset and the fault.

Exits non-zero on the first mismatch. Prints a summary: files, records compared, result.
"""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

import numpy
import ptufile
from ptufile import PtuFile, PtuRecordType

RECTYPE_TAG = b'TTResultFormat_TTTRRecType'
# The writer's marker bits (ptufile.PtuWriter: line start 1, line stop 2, frame change 3 as
# bit numbers from 1).
WRITER_MARKERS = {1, 2, 4}
# Formats with the HydraHarp/MultiHarp record layout (special:1, channel:6, dtime:15, nsync:10).
RETYPED = [
    PtuRecordType.HydraHarp2T3,
    PtuRecordType.TimeHarp260NT3,
    PtuRecordType.TimeHarp260PT3,
    PtuRecordType.HydraHarpT3,
]
# Our reader's names (RecordType's Debug form) for the codes.
RUST_NAMES = {
    0x00010303: 'PicoHarpT3',
    0x00010304: 'HydraHarpV1T3',
    0x01010304: 'HydraHarpV2T3',
    0x00010305: 'TimeHarp260NT3',
    0x00010306: 'TimeHarp260PT3',
    0x00010307: 'MultiHarpT3',
}


class Mismatch(Exception):
    pass


def histograms(rng, shape, lam, empty_rows):
    """Poisson TCSPC histograms TYXCH with some empty lines (long stretches without photons: the
    writer then emits overflow records counting several wraps) and a few hot bins."""
    data = rng.poisson(lam, size=shape).astype(numpy.uint8)
    for y in empty_rows:
        data[:, y] = 0
    # A few hot bins: 250 photons in one bin of one pixel.
    t, ny, nx, nc, nh = shape
    for _ in range(4):
        data[rng.integers(t), rng.integers(ny), rng.integers(nx), rng.integers(nc), rng.integers(nh)] = 250
    return data


def write_files(workdir, rng):
    """Writes the ptufile files; returns [(path, description)]."""
    files = []
    # PicoHarp T3: 4 routing channels, 12-bit dtime (4096 bins of 4 ps), 76 MHz sync (a
    # sync period of 13157.89... ps, not a whole number of ps), 1 ms pixels: the 16-bit nsync
    # wraps (65536 syncs = 0.86 ms) in every pixel.
    path = os.path.join(workdir, 'picoharp_t3.ptu')
    data = histograms(rng, (2, 16, 16, 4, 4096), 0.012, empty_rows=[5])
    ptufile.imwrite(path, data, 1 / 76e6, 4e-12, pixel_time=1e-3, record_type=PtuRecordType.PicoHarpT3,
                    comment='qkd-link PTU interop test')
    files.append((path, data, 'ptufile PicoHarpT3, 2 frames 16x16, 4 channels, 4096 bins'))
    # GenericT3: 8 channels, 1024 bins of 10 ps, 80 MHz sync, 100 us pixels = 8000 syncs: the
    # 10-bit nsync wraps several times per pixel; empty lines give overflow counts above 1.
    path = os.path.join(workdir, 'generic_t3.ptu')
    data = histograms(rng, (3, 20, 20, 8, 1024), 0.012, empty_rows=[0, 7, 8])
    ptufile.imwrite(path, data, 12.5e-9, 10e-12, pixel_time=100e-6, record_type=PtuRecordType.GenericT3,
                    comment='qkd-link PTU interop test')
    files.append((path, data, 'ptufile GenericT3, 3 frames 20x20, 8 channels, 1024 bins'))
    generic = path
    # GenericT3 with the full 15-bit dtime: 32768 bins of 1 ps, 20 MHz sync, 63 channels used
    # up to channel 62 (the highest a photon record can carry).
    path = os.path.join(workdir, 'generic_t3_wide.ptu')
    data = numpy.zeros((1, 4, 4, 63, 32768), numpy.uint8)
    idx = rng.integers(0, [1, 4, 4, 63, 32768], size=(20000, 5))
    numpy.add.at(data, tuple(idx.T), 1)
    data[0, 1, 2, 62, 32767] += 3
    data[0, 2, 1, 0, 0] += 3
    ptufile.imwrite(path, data, 50e-9, 1e-12, pixel_time=200e-6, record_type=PtuRecordType.GenericT3)
    files.append((path, data, 'ptufile GenericT3, 4x4, 63 channels, 32768 bins'))
    # The GenericT3 file retyped.
    blob = open(generic, 'rb').read()
    at = blob.index(RECTYPE_TAG) + 40
    for rt in RETYPED:
        path = os.path.join(workdir, f'generic_as_{rt.name}.ptu')
        with open(path, 'wb') as f:
            f.write(blob[:at] + struct.pack('<q', int(rt)) + blob[at + 8:])
        files.append((path, None, f'generic_t3.ptu retyped as {rt.name} (0x{int(rt):08x})'))
    return files


def rust_round(x):
    """Round half away from zero (Rust's f64::round), for x >= 0, exactly."""
    f = numpy.floor(x)
    return numpy.where(x - f >= 0.5, f + 1, f).astype(numpy.uint64)


def expected(path, data):
    """The expected stream and the header facts, from ptufile alone."""
    with PtuFile(path) as p:
        rt = int(p.record_type)
        g, r = float(p.global_resolution), float(p.tcspc_resolution)
        raw = p.read_records()
        dec = p.decode_records(raw)
        info = {
            'record_type': rt,
            'global_resolution_s': g,
            'resolution_s': r,
            'num_records': int(p.tags['TTResult_NumberOfRecords']),
            'header_len': int(p.record_offset),
        }
        if data is not None:
            # The writer's own round trip: its decoder gives back the histograms written.
            back = p.decode_image(dtype='uint16')
            back = numpy.asarray(back)
            if back.shape[-1] < data.shape[-1]:
                # Trailing empty bins are not part of the decoded histogram.
                pad = [(0, 0)] * (back.ndim - 1) + [(0, data.shape[-1] - back.shape[-1])]
                back = numpy.pad(back, pad)
            if back.shape != data.shape or not numpy.array_equal(back, data):
                raise Mismatch(f'{path}: ptufile does not read back its own histograms '
                               f'({back.shape} vs {data.shape})')
    if len(raw) != info['num_records']:
        raise Mismatch(f'{path}: {len(raw)} records in the file, header announces {info["num_records"]}')
    nsync = dec['time'].astype(numpy.uint64)
    chan = dec['channel'].astype(numpy.int64)
    marker = dec['marker'].astype(numpy.int64)
    photon = chan >= 0
    is_marker = (~photon) & (marker > 0)
    overflow = (~photon) & (marker == 0)
    keep = photon | is_marker
    sync_ps, dtime_ps = g * 1e12, r * 1e12
    t = nsync.astype(numpy.float64) * sync_ps
    t = numpy.where(photon, t + dec['dtime'].astype(numpy.float64) * dtime_ps, t)
    exp = {
        'kind': numpy.where(photon, 0, 1)[keep],  # 0 tag, 1 marker
        'value': numpy.where(photon, chan + 1, marker)[keep],
        'time_ps': rust_round(t)[keep],
    }
    # Coverage: overflow records and, for the HydraHarp layout, their count field.
    stats = {'photons': int(photon.sum()), 'markers': int(is_marker.sum()), 'overflows': int(overflow.sum())}
    if rt != PtuRecordType.PicoHarpT3:
        counts = (raw[overflow] & 0x3FF).astype(numpy.int64)
        stats['overflows_count_gt1'] = int((counts > 1).sum())
    stats['max_dtime'] = int(dec['dtime'][photon].max())
    stats['max_channel'] = int(chan[photon].max()) + 1
    stats['last_sync'] = int(nsync.max())
    bad = set(numpy.unique(marker[is_marker]).tolist()) - WRITER_MARKERS
    if bad:
        raise Mismatch(f'{path}: ptufile decoded marker bits {sorted(bad)} the writer does not write')
    return info, exp, stats


def run_dump(dump, path):
    p = subprocess.run([dump, path], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def parse_dump(path, out):
    head = {}
    kinds, values, times = [], [], []
    for n, line in enumerate(out.splitlines(), 1):
        f = line.split(' ')
        if f[0] == 'tag' or f[0] == 'marker':
            try:
                v, t = int(f[1]), int(f[2])
            except (IndexError, ValueError):
                raise Mismatch(f'{path}: ptu_dump line {n} not understood: {line!r}') from None
            kinds.append(0 if f[0] == 'tag' else 1)
            values.append(v)
            times.append(t)
        elif f[0] == 'gap':
            raise Mismatch(f'{path}: ptu_dump line {n}: a gap record, which PTU files cannot hold: {line}')
        elif f[0] in ('file', 'record_type', 'global_resolution_s', 'resolution_s', 'num_records', 'header_len'):
            head[f[0]] = f[1:]
        else:
            raise Mismatch(f'{path}: ptu_dump line {n} not understood: {line!r}')
    got = {
        'kind': numpy.array(kinds, numpy.int64),
        'value': numpy.array(values, numpy.int64),
        'time_ps': numpy.array(times, numpy.uint64),
    }
    return head, got


def compare(path, info, exp, head, got):
    rt = info['record_type']
    want_head = {
        'record_type': [RUST_NAMES[rt], f'0x{rt:08x}', 'T3'],
        'num_records': [str(info['num_records'])],
        'header_len': [str(info['header_len'])],
    }
    for k, v in want_head.items():
        if head.get(k) != v:
            raise Mismatch(f'{path}: ptu_dump header {k} = {head.get(k)}, ptufile says {v}')
    for k in ('global_resolution_s', 'resolution_s'):
        if k not in head or float(head[k][0]) != info[k]:
            raise Mismatch(f'{path}: ptu_dump header {k} = {head.get(k)}, ptufile says {info[k]!r}')
    n_exp, n_got = len(exp['kind']), len(got['kind'])
    n = min(n_exp, n_got)
    diff = numpy.zeros(n, bool)
    for k in ('kind', 'value', 'time_ps'):
        diff |= exp[k][:n] != got[k][:n]
    if diff.any() or n_exp != n_got:
        first = int(numpy.argmax(diff)) if diff.any() else n
        names = ('tag', 'marker')

        def show(s, i):
            return f'{names[s["kind"][i]]} {s["value"][i]} {s["time_ps"][i]}' if i < len(s['kind']) else '(end)'

        lines = [f'{path}: ptu_dump disagrees with ptufile: {int(diff.sum())} of {n} records differ, '
                 f'{n_got} records from ptu_dump, {n_exp} expected; first difference at record {first}:']
        for i in range(max(0, first - 2), first + 3):
            lines.append(f'  #{i}: expected {show(exp, i)}  got {show(got, i)}')
        raise Mismatch('\n'.join(lines))
    return n_exp


def malformed(dump, workdir, source):
    """Malformed copies of `source`: ptu_dump must fail naming the file, offset and fault."""
    blob = open(source, 'rb').read()
    with PtuFile(source) as p:
        header_len = int(p.record_offset)
    rectype_at = blob.index(RECTYPE_TAG)  # the entry's offset
    k = 1000  # a record index well inside the file
    cases = [
        ('bad_magic', b'PQTTTX\0\0' + blob[8:], 0, r'bad magic'),
        # Cut inside the record-type entry: the reader names the entry it could not finish.
        ('truncated_header', blob[: rectype_at + 30], rectype_at, r'header truncated'),
        ('truncated_record', blob[: header_len + 4 * k + 3], header_len + 4 * k,
         r'record truncated: 3 of 4 bytes'),
        ('missing_records', blob[: header_len + 4 * k], header_len + 4 * k,
         r'record truncated: 0 of 4 bytes \(\d+ records missing\)'),
        ('unknown_record_type',
         blob[: rectype_at + 40] + struct.pack('<q', 0x00010299) + blob[rectype_at + 48:],
         rectype_at, r'unknown record type 0x00010299'),
    ]
    for name, content, offset, what in cases:
        path = os.path.join(workdir, f'malformed_{name}.ptu')
        with open(path, 'wb') as f:
            f.write(content)
        code, out, err = run_dump(dump, path)
        err = err.strip()
        if code == 0:
            raise Mismatch(f'{path}: ptu_dump exited 0 on a malformed file ({name})')
        pattern = re.escape(path) + f': byte {offset}: ' + what
        if not re.search(pattern, err):
            raise Mismatch(f'{path}: ptu_dump exited {code}, but its message does not match '
                           f'{pattern!r}:\n  {err}')
        if name in ('truncated_record', 'missing_records'):
            # The records before the fault were delivered, and they are ptufile's.
            n_tags = sum(1 for line in out.splitlines() if line.startswith(('tag ', 'marker ')))
            if n_tags == 0:
                raise Mismatch(f'{path}: no records printed before the fault')
        print(f'  {name:20} exit {code}: {err}')
    return len(cases)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--dump', required=True, help='the ptu_dump example binary')
    ap.add_argument('--workdir', help='where to write the files (default: a temporary directory)')
    ap.add_argument('--seed', type=int, default=int(os.environ.get('PTU_SEED', '20260214')))
    args = ap.parse_args()
    start = time.monotonic()
    print(f'ptufile {ptufile.__version__}, numpy {numpy.__version__}, seed {args.seed}')
    rng = numpy.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        total = 0
        try:
            files = write_files(workdir, rng)
            for path, data, what in files:
                info, exp, stats = expected(path, data)
                code, out, err = run_dump(args.dump, path)
                if code != 0:
                    raise Mismatch(f'{path}: ptu_dump exited {code}: {err.strip()}')
                head, got = parse_dump(path, out)
                n = compare(path, info, exp, head, got)
                total += n
                print(f'  {os.path.basename(path)}: {what}')
                print(f'    {n} records equal ({stats["photons"]} tags, {stats["markers"]} markers); '
                      f'{info["num_records"]} records in the file, {stats["overflows"]} overflows'
                      + (f' ({stats["overflows_count_gt1"]} with a count above 1)'
                         if 'overflows_count_gt1' in stats else '')
                      + f'; last sync {stats["last_sync"]}, dtime up to {stats["max_dtime"]}, '
                        f'channels up to {stats["max_channel"]}')
            print('malformed copies of generic_t3.ptu:')
            n_bad = malformed(args.dump, workdir, os.path.join(workdir, 'generic_t3.ptu'))
        except Mismatch as e:
            print(f'FAIL: {e}', file=sys.stderr)
            return 1
    print(f'PTU interop: {len(files)} files from ptufile, {total} records (tags and markers) equal, '
          f'{n_bad} malformed files rejected with file and offset: OK ({time.monotonic() - start:.1f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
