#!/usr/bin/env python3
"""Deterministic generator for callrecon's sample data.

Run from the repository root:

    python3 samples/gen.py

It writes the platform tables (call_groups.csv, calls.csv, and the late arrivals
call_groups_late.csv and calls_late.csv), the API queue
(queue/api-events.ndjson), three inbox files (inbox/*), README.md with the expected outcome
counts and expected.json with the expected decision for every record.

The expected outcomes are not taken from the generation plan: after writing the files the
generator reads them back with an independent parser and matcher (see "Oracle" below) that
implements the matching rules of jobs/demo.toml, and then checks that the plan and the oracle
agree. So the counts in README.md describe the files as written.

Standard library only; a fixed seed makes every run byte-identical.
"""

import csv
import io
import json
import random
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

try:
    from zoneinfo import ZoneInfo

    NEW_YORK = ZoneInfo("America/New_York")
except Exception:  # no tz database: 2026-11-02..04 is after the DST change of 2026-11-01
    NEW_YORK = timezone(timedelta(hours=-5), "EST")

UTC = timezone.utc
SEED = 20261102
OUT = Path(__file__).resolve().parent

rng = random.Random(SEED)
# The MasterId events draw from a generator of their own, so that adding them left every other
# record as it was.
mrng = random.Random(SEED + 21)

# --------------------------------------------------------------------------------------------
# Sizes and fixed values
# --------------------------------------------------------------------------------------------

N_GROUPS = 40
N_CALLS = 300  # including the two deliberately close call pairs
N_REPEAT_PHONES = 20
GROUPED_SHARE = 0.60
N_RUNNING = 5
DAYS = [datetime(2026, 11, d, tzinfo=UTC) for d in (2, 3, 4)]
AGENTS = [f"agent-{i:02d}" for i in range(1, 16)]
DNIS = ["+18885550142", "+18775550199", "+12125550123", "+13125550177"]
WINDOW = timedelta(minutes=10)  # the phone-and-agent rule's window (before and after)

QUEUES = {
    "billing": ["billing>card", "billing>balance", "billing>refund"],
    "technical-support": ["support>internet", "support>device", "support>outage"],
    "sales": ["sales>new-line", "sales>upgrade"],
    "retention": ["account>cancel", "account>retention"],
    "claims": ["claims>new", "claims>status"],
}
TIERS = ["bronze", "silver", "gold", "platinum"]
DISPOSITIONS = ["resolved", "callback", "escalated", "transferred", "voicemail"]
CONTACT_REASONS = ["billing-question", "outage", "upgrade", "cancel-request", "claim-status"]
CASE_STATUSES = ["open", "pending-customer", "escalated", "resolved", "closed"]

# Real area codes make the numbers look plausible; exchanges avoid N11 and 555.
AREA_CODES = ["212", "646", "917", "718", "347", "201", "973", "215", "267", "617",
              "857", "312", "773", "305", "786", "404", "470", "713", "832", "415"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def compact(obj):
    """JSON as the platform stores it in CSV cells: no spaces."""
    return json.dumps(obj, separators=(",", ":"))


def iso_z(dt):
    """RFC 3339 UTC with whole seconds, the format of the platform's call table."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def fmt_event_time(dt, style):
    """Render an event time in one of the forms customers send.

    Styles without fractional seconds truncate the milliseconds; the oracle reads the text
    back, so the expected outcomes always refer to what is in the file.
    """
    u = dt.astimezone(UTC)
    local = dt.astimezone(NEW_YORK)
    ms = u.microsecond // 1000
    off = local.strftime("%z")
    off = off[:3] + ":" + off[3:]
    if style == "ms_z":          # 2026-11-02T14:03:11.123Z
        return f"{u:%Y-%m-%dT%H:%M:%S}.{ms:03d}Z"
    if style == "z":             # 2026-11-02T14:03:11Z
        return f"{u:%Y-%m-%dT%H:%M:%S}Z"
    if style == "offset":        # 2026-11-02T09:03:11.123-05:00
        return f"{local:%Y-%m-%dT%H:%M:%S}.{ms:03d}{off}"
    if style == "offset_s":      # 2026-11-02T09:03:11-05:00
        return f"{local:%Y-%m-%dT%H:%M:%S}{off}"
    if style == "slash":         # 2026/11/02T14:03:11.123Z, the API's own form
        return f"{u:%Y/%m/%dT%H:%M:%S}.{ms:03d}Z"
    if style == "space":         # 2026-11-02 14:03:11Z
        return f"{u:%Y-%m-%d %H:%M:%S}Z"
    if style == "plus0":         # 2026-11-02T14:03:11+00:00
        return f"{u:%Y-%m-%dT%H:%M:%S}+00:00"
    if style == "naive_local":   # 2026-11-03 09:15:00, in the job's timezone
        return f"{local:%Y-%m-%d %H:%M:%S}"
    raise ValueError(style)


def pick_style(weights):
    styles, w = zip(*weights)
    return rng.choices(styles, weights=w)[0]


API_STYLES = [("ms_z", 6), ("slash", 3), ("offset", 1), ("z", 1)]
CRM_STYLES = [("offset_s", 4), ("z", 3), ("space", 2), ("plus0", 1), ("ms_z", 1)]


def with_ms(dt):
    return dt + timedelta(milliseconds=rng.randint(0, 999))


def phone_formats(ani):
    """The same E.164 number written the ways CRMs write it."""
    d = ani[2:]  # drop "+1"
    a, x, line = d[:3], d[3:6], d[6:]
    return [
        f"({a}) {x}-{line}",
        f"+1 {a}-{x}-{line}",
        f"1{d}",
        d,
        f"{a}.{x}.{line}",
        f"+1{d}",
    ]


def new_phone(taken):
    while True:
        area = rng.choice(AREA_CODES)
        exch = f"{rng.randint(2, 9)}{rng.randint(0, 9)}{rng.randint(0, 9)}"
        if exch[1:] == "11" or exch == "555":
            continue
        p = f"+1{area}{exch}{rng.randint(0, 9999):04d}"
        if p not in taken:
            taken.add(p)
            return p


def new_session(taken):
    while True:
        s = f"sess-{rng.getrandbits(32):08x}"
        if s not in taken:
            taken.add(s)
            return s


# --------------------------------------------------------------------------------------------
# Platform data: call groups and calls
# --------------------------------------------------------------------------------------------

def make_groups():
    numbers = sorted(rng.sample(range(1000, 10000), N_GROUPS))
    groups = []
    for i, n in enumerate(numbers, 1):
        groups.append({
            "id": f"grp-{i:04d}",
            "metadata": {"caseNumber": f"C-{n}", "queue": rng.choice(list(QUEUES))},
        })
    return groups


def business_start(day):
    """A start time within New York business hours (08:00-18:30 local = 13:00-23:30 UTC)."""
    return day + timedelta(hours=13, seconds=rng.randint(0, 10 * 3600 + 1800))


def overlaps(intervals, s, e):
    return any(s < ie and is_ < e for is_, ie in intervals)


def make_calls(groups, phones_taken, sessions_taken):
    """Calls over three days.

    - ~20 repeat callers whose calls never share an agent, so that a sessionless event with
      phone + agent has exactly one candidate; the exceptions are the two deliberate pairs.
    - two "close pairs": the same caller and agent twice, 12 minutes apart, so that an event
      halfway between them is a tie (ambiguous) and one nearer the first call is not.
    - agents never take overlapping calls.
    """
    slots = []  # dicts: start, end, ani, agent (fixed for pairs), tag

    # The close pairs first, so their agents are reserved for those intervals.
    pair_specs = [(DAYS[0] + timedelta(hours=15, minutes=8, seconds=14), "agent-04"),
                  (DAYS[1] + timedelta(hours=19, minutes=41, seconds=2), "agent-11")]
    pairs = []
    for n, (start, agent) in enumerate(pair_specs, 1):
        ani = new_phone(phones_taken)
        a_end = start + timedelta(minutes=7, seconds=46)
        b_start = a_end + timedelta(minutes=12)
        b_end = b_start + timedelta(minutes=9, seconds=20)
        a = {"start": start, "end": a_end, "ani": ani, "agent": agent, "tag": f"pair{n}a"}
        b = {"start": b_start, "end": b_end, "ani": ani, "agent": agent, "tag": f"pair{n}b"}
        slots += [a, b]
        pairs.append((a, b))

    # Repeat callers: 2-4 calls each, spread over the three days.
    repeat_phones = [new_phone(phones_taken) for _ in range(N_REPEAT_PHONES)]
    for p in repeat_phones:
        for _ in range(rng.choice([2, 2, 3, 3, 4])):
            slots.append({"ani": p, "agent": None, "tag": "repeat"})
    # Everybody else calls once.
    while len(slots) < N_CALLS:
        slots.append({"ani": new_phone(phones_taken), "agent": None, "tag": "single"})

    for s in slots:
        if "start" not in s:
            s["start"] = business_start(rng.choice(DAYS))
            s["end"] = s["start"] + timedelta(seconds=rng.randint(60, 1200))

    # Agents: reserve the pairs, then give every other call a free agent this caller has not
    # spoken to yet.
    busy = {a: [] for a in AGENTS}
    for a, b in pairs:
        for c in (a, b):
            busy[c["agent"]].append((c["start"], c["end"]))
    agents_of_phone = {}
    for a, b in pairs:
        agents_of_phone[a["ani"]] = [a["agent"]]
    slots.sort(key=lambda s: s["start"])
    for s in slots:
        if s["agent"]:
            continue
        used = agents_of_phone.setdefault(s["ani"], [])
        free = [a for a in AGENTS if a not in used and not overlaps(busy[a], s["start"], s["end"])]
        if not free:
            sys.exit("no free agent; change the seed or the sizes")
        s["agent"] = rng.choice(free)
        used.append(s["agent"])
        busy[s["agent"]].append((s["start"], s["end"]))

    # The latest calls are still running at export time: no ended_at.
    for s in slots[-N_RUNNING:]:
        s["end"] = None
        s["tag"] += "+running"

    # Groups: most repeat callers' calls belong to one case; every group has a call; then
    # single calls are added to groups until ~60% of calls are grouped.
    group_of_slot = {}
    shuffled_groups = groups[:]
    rng.shuffle(shuffled_groups)
    case_callers = rng.sample(repeat_phones, 12)
    for p, g in zip(case_callers, shuffled_groups):
        for i, s in enumerate(slots):
            if s["ani"] == p:
                group_of_slot[i] = g
    ungrouped = [i for i, s in enumerate(slots) if i not in group_of_slot and s["tag"] == "single"]
    rng.shuffle(ungrouped)
    for g in shuffled_groups[len(case_callers):]:
        group_of_slot[ungrouped.pop()] = g
    target = round(GROUPED_SHARE * N_CALLS)
    while len(group_of_slot) < target:
        group_of_slot[ungrouped.pop()] = rng.choice(groups)

    calls = []
    for i, s in enumerate(slots, 1):
        g = group_of_slot.get(i - 1)
        queue = g["metadata"]["queue"] if g else rng.choice(list(QUEUES))
        calls.append({
            "id": f"call-{i:04d}",
            "session_id": new_session(sessions_taken),
            "call_group_id": g["id"] if g else "",
            "started_at": s["start"],
            "ended_at": s["end"],
            "ani": s["ani"],
            "dnis": rng.choice(DNIS),
            "agent_id": s["agent"],
            "metadata": {"ivrPath": rng.choice(QUEUES[queue]),
                         "language": rng.choices(["en", "es"], weights=[85, 15])[0]},
            "tag": s["tag"],
        })
    by_tag = {c["tag"]: c for c in calls}
    pair_calls = [(by_tag["pair1a"], by_tag["pair1b"]), (by_tag["pair2a"], by_tag["pair2b"])]
    return calls, pair_calls


def make_late_call(groups, phones_taken):
    """A call whose row reaches the platform after the API event that names its session."""
    start = DAYS[2] + timedelta(hours=16, minutes=2, seconds=37)
    return {
        "id": "call-late-01",
        "session_id": "sess-late0001",
        "call_group_id": groups[6]["id"],
        "started_at": start,
        "ended_at": start + timedelta(minutes=13, seconds=5),
        "ani": new_phone(phones_taken),
        "dnis": DNIS[0],
        "agent_id": "agent-07",
        "metadata": {"ivrPath": "billing>balance", "language": "en"},
        "tag": "late",
    }


def make_late_group():
    """A call group that reaches the platform after the MasterId event addressed to it."""
    return {"id": "grp-late-01", "metadata": {"caseNumber": "C-0042", "queue": "claims"}}


def master_time():
    """A business-hours moment, drawn from the MasterId events' own generator."""
    return (mrng.choice(DAYS) + timedelta(hours=13, seconds=mrng.randint(0, 10 * 3600 + 1800),
                                          milliseconds=mrng.randint(0, 999)))


def master_fields():
    """What a case system posts for a master call (a call group)."""
    return {"caseStatus": mrng.choice(CASE_STATUSES), "caseOwner": mrng.choice(["team-a", "team-b", "tier2"])}


CALL_COLUMNS = ["id", "session_id", "call_group_id", "started_at", "ended_at",
                "ani", "dnis", "agent_id", "metadata"]


def write_calls(path, calls):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CALL_COLUMNS)
        for c in calls:
            w.writerow([c["id"], c["session_id"], c["call_group_id"], iso_z(c["started_at"]),
                        iso_z(c["ended_at"]) if c["ended_at"] else "", c["ani"], c["dnis"],
                        c["agent_id"], compact(c["metadata"])])


def write_groups(path, groups):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "metadata"])
        for g in groups:
            w.writerow([g["id"], compact(g["metadata"])])


# --------------------------------------------------------------------------------------------
# Customer profiles: a caller keeps the same CRM account and tier across events
# --------------------------------------------------------------------------------------------

PROFILE = {}


def profile(ani):
    if ani not in PROFILE:
        PROFILE[ani] = {"crmAccountId": f"A-{rng.randint(1000, 99999)}",
                        "accountTier": rng.choices(TIERS, weights=[3, 4, 3, 1])[0]}
    return PROFILE[ani]


def crm_fields(call):
    """Fields a CRM attaches to a contact: account, tier and some free-form data."""
    p = profile(call["ani"])
    md = {"crmAccountId": p["crmAccountId"], "accountTier": p["accountTier"]}
    extra = rng.sample(["customerDataField1", "disposition", "contactReason", "npsScore"],
                       rng.randint(1, 3))
    for k in extra:
        if k == "customerDataField1":
            md[k] = p["accountTier"]
        elif k == "disposition":
            md[k] = rng.choice(DISPOSITIONS)
        elif k == "contactReason":
            md[k] = rng.choice(CONTACT_REASONS)
        else:
            md[k] = rng.randint(0, 10)
    return md


def time_inside(call):
    """A moment during the call (for a running call: the first five minutes)."""
    if call["ended_at"]:
        span = int((call["ended_at"] - call["started_at"]).total_seconds()) - 1
    else:
        span = 300
    return with_ms(call["started_at"] + timedelta(seconds=rng.randint(0, span)))


def time_near(call):
    """A moment up to 9.5 minutes before the start or after the end: in the window, outside
    the call. (The window edge itself is tested by one deliberate event.)"""
    end = call["ended_at"] or call["started_at"]
    delta = timedelta(seconds=rng.randint(5, 570))
    if rng.random() < 0.5:
        return call["started_at"] - delta
    return end + delta


def event(sid, when, md, keys=("SessionId", "EventTime", "Metadata")):
    """An event object with the given spellings of the top-level keys; sid None -> no key."""
    obj = {}
    if sid is not None:
        obj[keys[0]] = sid
    obj[keys[1]] = when
    obj[keys[2]] = md
    return obj


def api_keys():
    """Most API clients use the documented spelling; some do not (keys are case-insensitive)."""
    return (rng.choices(["SessionId", "sessionID", "sessionId"], weights=[8, 1, 1])[0],
            rng.choices(["EventTime", "eventTime"], weights=[9, 1])[0],
            rng.choices(["Metadata", "metaData", "metadata"], weights=[8, 1, 1])[0])


# Each planned record carries what the generator intends it to be; the oracle must agree.
# expect = ("matched", rule, target_id) | ("pending", reason) | ("bad",)


# --------------------------------------------------------------------------------------------
# The API queue
# --------------------------------------------------------------------------------------------

def make_queue(calls, late_call, reserved, groups, late_group):
    """~120 API events, ordered by arrival (event time plus a delivery delay)."""
    pool = [c for c in calls if c["id"] not in reserved]
    items = []  # (arrival, line_text, expect)

    def add(obj, arrival, expect):
        items.append((arrival, json.dumps(obj), expect))

    # Ordinary events: some calls get several.
    targets = rng.sample(pool, 85)
    targets += rng.sample(targets, 28)
    for c in targets:
        t = time_inside(c)
        md = crm_fields(c)
        add(event(c["session_id"], fmt_event_time(t, pick_style(API_STYLES)), md, api_keys()),
            t + timedelta(seconds=rng.randint(1, 90)), ("matched", "session", c["id"]))

    # Merge order: two events set customerDataField1 on the same call. The one that happened
    # later ("platinum") is delivered first; the earlier one ("gold") arrives late. Merging by
    # event time must leave "platinum".
    c = reserved["merge"]
    t_early = c["started_at"] + timedelta(minutes=2, seconds=10, milliseconds=250)
    t_late = c["started_at"] + timedelta(minutes=6, seconds=42, milliseconds=900)
    base = {"crmAccountId": profile(c["ani"])["crmAccountId"]}
    add(event(c["session_id"], fmt_event_time(t_late, "ms_z"),
              {**base, "customerDataField1": "platinum", "accountTier": "platinum"}),
        t_late + timedelta(seconds=3), ("matched", "session", c["id"]))
    add(event(c["session_id"], fmt_event_time(t_early, "ms_z"),
              {**base, "customerDataField1": "gold", "accountTier": "gold"}),
        t_late + timedelta(minutes=4, seconds=30), ("matched", "session", c["id"]))

    # The late call: its session is known to the API before the platform's call row exists.
    t = late_call["started_at"] + timedelta(minutes=4, seconds=12, milliseconds=77)
    add(event(late_call["session_id"], fmt_event_time(t, "ms_z"), crm_fields(late_call)),
        t + timedelta(seconds=20), ("late", late_call["id"]))

    # Sessions that exist nowhere (e.g. a test tenant or a typo in the client).
    for sid, day, hh in (("sess-missing01", DAYS[0], 17), ("sess-missing02", DAYS[1], 21)):
        t = day + timedelta(hours=hh, minutes=rng.randint(0, 59), seconds=rng.randint(0, 59))
        add(event(sid, fmt_event_time(t, "ms_z"),
                  {"crmAccountId": f"A-{rng.randint(1000, 99999)}", "accountTier": "silver"}),
            t + timedelta(seconds=5), ("pending", "unknown_session"))

    # Bad: an EventTime nobody can place.
    c = rng.choice(pool)
    t = time_inside(c)
    add(event(c["session_id"], "yesterday", crm_fields(c)), t, ("bad",))

    # Bad: a line that is not JSON at all (a write cut off mid-record).
    c = rng.choice(pool)
    t = time_inside(c)
    whole = json.dumps(event(c["session_id"], fmt_event_time(t, "ms_z"), crm_fields(c)))
    items.append((t, whole[:whole.index("Metadata") + 24], ("bad",)))

    # MasterId (the platform's masterCall endpoint): to the group, and so to every call in it.
    # One is addressed to the late call's group, which the late call joins afterwards.
    late_call_group = next(g for g in groups if g["id"] == late_call["call_group_id"])
    for key, g in zip(("MasterId", "masterId", "MasterID"), [late_call_group] + mrng.sample(groups[7:], 2)):
        t = master_time() if g is not late_call_group else (
            late_call["started_at"] - timedelta(hours=2, minutes=mrng.randint(0, 59)))
        add({key: g["id"], "EventTime": fmt_event_time(t, "ms_z"), "Metadata": master_fields()},
            t + timedelta(seconds=mrng.randint(1, 90)), ("matched", "master_id", g["id"]))
    # A group the platform has not exported yet (it lands with the late call), and one it never
    # has (a typo in the client).
    for gid, expect in ((late_group["id"], ("late_group", late_group["id"])),
                        ("grp-9999", ("pending", "unknown_group"))):
        t = DAYS[2] + timedelta(hours=15, minutes=mrng.randint(0, 59), seconds=mrng.randint(0, 59))
        add({"MasterId": gid, "EventTime": fmt_event_time(t, "ms_z"), "Metadata": master_fields()},
            t + timedelta(seconds=7), expect)
    # Bad: addressed to a call and to a group at once.
    c = mrng.choice(pool)
    t = c["started_at"] + timedelta(seconds=30)
    add({"SessionId": c["session_id"], "MasterId": mrng.choice(groups)["id"],
         "EventTime": fmt_event_time(t, "ms_z"), "Metadata": master_fields()}, t, ("bad",))

    items.sort(key=lambda x: x[0])
    return [(line, expect) for _, line, expect in items]


# --------------------------------------------------------------------------------------------
# Inbox: CRM contact export (sessionless, phone-and-agent)
# --------------------------------------------------------------------------------------------

def crm_event(call, when, style, phone_fmt=None, agent=None):
    md = {"customerPhone": phone_fmt or rng.choice(phone_formats(call["ani"])),
          "agentId": agent or call["agent_id"]}
    md.update(crm_fields(call))
    return {"EventTime": fmt_event_time(when, style), "Metadata": md}


def make_crm_inbox(calls, pair_calls, reserved, phones_taken, used_targets):
    """~60 sessionless CRM events keyed by customer phone and agent."""
    pool = [c for c in calls if c["id"] not in reserved and c["id"] not in used_targets]
    records = []  # (sort_time, obj_or_text, expect)

    # Matches: 2/3 during the call, 1/3 in the 10-minute margins.
    for c in rng.sample(pool, 48):
        used_targets.add(c["id"])
        t = time_inside(c) if rng.random() < 0.66 else time_near(c)
        records.append((t, crm_event(c, t, pick_style(CRM_STYLES)),
                        ("matched", "phone-and-agent", c["id"])))

    # The window is inclusive: exactly 10 minutes before the start still matches.
    c = next(c for c in pool if c["id"] not in used_targets and c["ended_at"])
    used_targets.add(c["id"])
    t = c["started_at"] - WINDOW
    records.append((t, crm_event(c, t, "z"), ("matched", "phone-and-agent", c["id"])))

    # A time without an offset is New York time (the job's timezone): 09:xx local = 14:xx UTC.
    c = next(c for c in pool if c["id"] not in used_targets and c["ended_at"]
             and c["started_at"].date() == DAYS[1].date()
             and c["started_at"].astimezone(NEW_YORK).hour == 9)
    used_targets.add(c["id"])
    t = c["started_at"] + timedelta(seconds=(c["ended_at"] - c["started_at"]).seconds // 2)
    records.append((t, crm_event(c, t, "naive_local"), ("matched", "phone-and-agent", c["id"])))

    # Nearest wins: both calls of the first close pair are in the window, the first is nearer.
    a, b = pair_calls[0]
    t = a["ended_at"] + timedelta(minutes=3)
    records.append((t, crm_event(a, t, "offset_s"), ("matched", "phone-and-agent", a["id"])))

    # Ambiguous: exactly halfway between the two calls of each close pair (6 minutes from
    # either), so the nearest-in-time tie-break cannot choose.
    for a, b in pair_calls:
        t = a["ended_at"] + (b["started_at"] - a["ended_at"]) / 2
        records.append((t, crm_event(a, t, "z"), ("pending", "ambiguous")))

    # No candidate: a number on no call ...
    for _ in range(2):
        c = rng.choice(pool)
        t = time_inside(c)
        ev = crm_event(c, t, pick_style(CRM_STYLES),
                       phone_fmt=rng.choice(phone_formats(new_phone(phones_taken))))
        records.append((t, ev, ("pending", "no_candidate")))
    # ... the right caller and agent but two hours after the call ...
    c = next(c for c in pool if c["id"] not in used_targets and c["ended_at"]
             and c["tag"] == "single" and c["started_at"].date() != DAYS[2].date())
    t = c["ended_at"] + timedelta(hours=2, minutes=4)
    records.append((t, crm_event(c, t, "offset_s"), ("pending", "no_candidate")))
    # ... and the right caller and time but an agent who did not take the call.
    c = next(c for c in pool if c["id"] not in used_targets and c["tag"] == "single")
    t = time_inside(c)
    other = next(a for a in AGENTS if a != c["agent_id"])
    records.append((t, crm_event(c, t, "z", agent=other), ("pending", "no_candidate")))

    # Missing key: contacts logged without a phone number (neither customerPhone nor crmCaseId).
    for _ in range(3):
        c = rng.choice(pool)
        t = time_inside(c)
        ev = crm_event(c, t, pick_style(CRM_STYLES))
        del ev["Metadata"]["customerPhone"]
        ev["Metadata"]["contactChannel"] = "email"
        records.append((t, ev, ("pending", "missing_key")))

    # Bad: Metadata is a string, not an object.
    c = rng.choice(pool)
    t = time_inside(c)
    ev = crm_event(c, t, "z")
    ev["Metadata"] = "customerPhone=" + ev["Metadata"]["customerPhone"]
    records.append((t, ev, ("bad",)))

    records.sort(key=lambda r: r[0])
    return [(json.dumps(obj), expect) for _, obj, expect in records]


# --------------------------------------------------------------------------------------------
# Inbox: case-management CSV (crm-case)
# --------------------------------------------------------------------------------------------

CASE_COLUMNS = ["SessionId", "MasterId", "EventTime", "crmCaseId", "caseStatus", "Metadata"]


def case_metadata():
    """The Metadata column: often empty, otherwise a JSON object."""
    r = rng.random()
    if r < 0.45:
        return ""
    if r < 0.75:
        return compact({"priority": rng.choice(["low", "normal", "high"])})
    return compact({"priority": rng.choice(["normal", "high"]),
                    "slaHours": rng.choice([4, 24, 48]),
                    "caseOwner": rng.choice(["team-a", "team-b", "tier2"])})


def make_cases_inbox(calls, groups, used_targets):
    rows = []  # (sort_time, row, expect)
    case_styles = [("slash", 4), ("z", 3), ("offset_s", 2), ("ms_z", 1)]

    def when():
        return with_ms(business_start(rng.choice(DAYS)))

    # Sessionless status updates for cases; a few cases get two updates.
    picked = rng.sample(groups, 21)
    picked += rng.sample(picked, 4)
    for g in picked:
        t = when()
        rows.append((t, ["", "", fmt_event_time(t, pick_style(case_styles)),
                         g["metadata"]["caseNumber"], rng.choice(CASE_STATUSES),
                         case_metadata()], ("matched", "crm-case", g["id"])))

    # A few rows written from a call screen carry the call's SessionId: they attach to the call.
    group_by_id = {g["id"]: g for g in groups}
    for c in rng.sample([c for c in calls if c["call_group_id"] and c["ended_at"]
                         and c["id"] not in used_targets and c["tag"] == "single"], 3):
        used_targets.add(c["id"])
        t = time_inside(c)
        case = group_by_id[c["call_group_id"]]["metadata"]["caseNumber"]
        rows.append((t, [c["session_id"], "", fmt_event_time(t, pick_style(case_styles)), case,
                         "open", case_metadata()], ("matched", "session", c["id"])))

    # No candidate: a case number the platform has never seen.
    known = {g["metadata"]["caseNumber"] for g in groups}
    unknown = next(f"C-{n}" for n in range(9999, 0, -1) if f"C-{n}" not in known)
    t = when()
    rows.append((t, ["", "", fmt_event_time(t, "slash"), unknown, "open", ""],
                 ("pending", "no_candidate")))

    # Bad: an impossible date.
    g = rng.choice(groups)
    rows.append((DAYS[1], ["", "", "2026-13-45 99:00", g["metadata"]["caseNumber"], "open", ""],
                 ("bad",)))

    # Rows of a case system that knows the master call: the MasterId column addresses the group
    # (its case number beside it, or none); the rules are not consulted.
    for g, with_case in zip(mrng.sample(groups, 2), (True, False)):
        t = master_time()
        rows.append((t, ["", g["id"], fmt_event_time(t, "z"), g["metadata"]["caseNumber"] if with_case else "",
                         mrng.choice(CASE_STATUSES), ""], ("matched", "master_id", g["id"])))

    rows.sort(key=lambda r: r[0])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CASE_COLUMNS)
    expects = []
    for _, row, expect in rows:
        w.writerow(row)
        expects.append(expect)
    return buf.getvalue(), expects


# --------------------------------------------------------------------------------------------
# Inbox: a JSON array export mixing everything
# --------------------------------------------------------------------------------------------

def make_export_inbox(calls, groups, reserved, used_targets):
    pool = [c for c in calls if c["id"] not in reserved and c["id"] not in used_targets]
    items = []  # (sort_time, obj, expect)

    # Sessionful: attach by SessionId.
    for c in rng.sample(pool, 7):
        used_targets.add(c["id"])
        t = time_inside(c)
        keys = rng.choice([("SessionId", "EventTime", "Metadata"),
                           ("sessionId", "eventTime", "metadata")])
        items.append((t, event(c["session_id"], fmt_event_time(t, pick_style(API_STYLES)),
                               crm_fields(c), keys), ("matched", "session", c["id"])))

    # Sessionless by phone and agent; one says so with "SessionId": null.
    pool = [c for c in pool if c["id"] not in used_targets]
    for i, c in enumerate(rng.sample(pool, 6)):
        used_targets.add(c["id"])
        t = time_inside(c) if i % 2 else time_near(c)
        ev = crm_event(c, t, pick_style(CRM_STYLES))
        if i == 0:
            ev = {"SessionId": None, **ev}
        items.append((t, ev, ("matched", "phone-and-agent", c["id"])))

    # Sessionless by case number; one with "SessionId": "".
    for i, g in enumerate(rng.sample(groups, 5)):
        t = with_ms(business_start(rng.choice(DAYS)))
        ev = {"EventTime": fmt_event_time(t, pick_style(API_STYLES)),
              "Metadata": {"crmCaseId": g["metadata"]["caseNumber"],
                           "caseStatus": rng.choice(CASE_STATUSES)}}
        if i == 0:
            ev = {"SessionId": "", **ev}
        items.append((t, ev, ("matched", "crm-case", g["id"])))

    # MasterId, spelled in lower case: the group and its calls.
    g = mrng.choice(groups)
    t = master_time()
    items.append((t, {"masterid": g["id"], "eventTime": fmt_event_time(t, "offset"),
                      "metadata": master_fields()}, ("matched", "master_id", g["id"])))

    # Missing key: a sessionless survey result with nothing to match on.
    t = with_ms(business_start(DAYS[2]))
    items.append((t, {"EventTime": fmt_event_time(t, "ms_z"),
                      "Metadata": {"surveyId": "S-2026-11", "npsScore": 9}},
                  ("pending", "missing_key")))

    # Bad: no Metadata at all.
    c = rng.choice(pool)
    t = time_inside(c)
    items.append((t, {"SessionId": c["session_id"], "EventTime": fmt_event_time(t, "ms_z")},
                  ("bad",)))

    items.sort(key=lambda x: x[0])
    return [obj for _, obj, _ in items], [e for _, _, e in items]


# --------------------------------------------------------------------------------------------
# Oracle: read the written files back and decide every record by the job's rules
# --------------------------------------------------------------------------------------------

TIME_RE = re.compile(
    r"^(\d{4})([-/])(\d{2})\2(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})?$")


def parse_time(s):
    """EventTime: RFC 3339 (any offset), the slash form, T or space, optional fraction;
    without an offset the time is in the job's timezone."""
    if not isinstance(s, str):
        return None
    m = TIME_RE.match(s)
    if not m:
        return None
    y, _, mo, d, h, mi, sec, frac, off = m.groups()
    try:
        micro = int((frac[1:] + "000000")[:6]) if frac else 0
        naive = datetime(int(y), int(mo), int(d), int(h), int(mi), int(sec), micro)
    except ValueError:
        return None
    if off is None:
        return naive.replace(tzinfo=NEW_YORK).astimezone(UTC)
    if off == "Z":
        return naive.replace(tzinfo=UTC)
    sign = 1 if off[0] == "+" else -1
    tz = timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[4:6])))
    return naive.replace(tzinfo=tz).astimezone(UTC)


def normalize_phone(s):
    digits = re.sub(r"\D", "", str(s))
    if len(digits) == 11 and digits.startswith("1"):
        digits = digits[1:]
    return digits


def read_calls(path):
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.append({
                "id": r["id"], "session_id": r["session_id"] or None,
                "call_group_id": r["call_group_id"] or None,
                "started_at": parse_time(r["started_at"]),
                "ended_at": parse_time(r["ended_at"]) if r["ended_at"] else None,
                "ani": r["ani"], "agent_id": r["agent_id"],
                "metadata": json.loads(r["metadata"]),
            })
    return out


def read_groups(path):
    with open(path, newline="") as f:
        return [{"id": r["id"], "metadata": json.loads(r["metadata"])}
                for r in csv.DictReader(f)]


def to_event(obj):
    """A record -> (session_id|None, master_id|None, time, metadata), or a string saying why it
    is bad."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    low = {}
    for k, v in obj.items():
        if k.lower() in low:
            return f"duplicate key {k}"
        low[k.lower()] = v
    sid = low.get("sessionid")
    if sid is not None and not isinstance(sid, str):
        return "SessionId is not a string"
    mid = low.get("masterid")
    if mid is not None and not isinstance(mid, str):
        return "MasterId is not a string"
    sid, mid = (sid or "").strip() or None, (mid or "").strip() or None
    if sid and mid:
        return "both SessionId and MasterId"
    t = parse_time(low.get("eventtime"))
    if t is None:
        return f"bad EventTime {low.get('eventtime')!r}"
    if "metadata" not in low:
        return "Metadata missing"
    if not isinstance(low["metadata"], dict):
        return "Metadata is not an object"
    return (sid, mid, t, low["metadata"])


def csv_row_to_obj(row):
    """A cases.csv row as an event: SessionId, MasterId and EventTime columns, the Metadata
    column (a JSON object or empty), and every other non-empty column as a metadata key."""
    md_text = row.get("Metadata") or ""
    try:
        md = json.loads(md_text) if md_text.strip() else {}
    except ValueError:
        md = md_text
    if isinstance(md, dict):
        for k, v in row.items():
            if k not in ("SessionId", "MasterId", "EventTime", "Metadata") and v != "":
                md[k] = v
    return {"SessionId": row.get("SessionId") or None, "MasterId": row.get("MasterId") or None,
            "EventTime": row.get("EventTime"), "Metadata": md}


def present(md, key):
    return md.get(key) not in (None, "")


def rule_phone_and_agent(t, md, calls):
    if not (present(md, "customerPhone") and present(md, "agentId")):
        return None  # keys missing: the rule does not apply
    phone = normalize_phone(md["customerPhone"])
    cands = []
    for c in calls:
        if normalize_phone(c["ani"]) != phone or c["agent_id"] != md["agentId"]:
            continue
        start = c["started_at"]
        end = c["ended_at"] or start
        if not (start - WINDOW <= t <= end + WINDOW):
            continue
        dist = (start - t) if t < start else (t - end) if t > end else timedelta(0)
        cands.append((dist, c["id"]))
    if not cands:
        return ("pending", "no_candidate", [])
    cands.sort()
    nearest = [cid for d, cid in cands if d == cands[0][0]]
    if len(nearest) > 1:
        return ("pending", "ambiguous", nearest)
    return ("matched", "phone-and-agent", nearest[0])


def rule_crm_case(md, groups):
    if not present(md, "crmCaseId"):
        return None
    hits = [g["id"] for g in groups if g["metadata"].get("caseNumber") == md["crmCaseId"]]
    if not hits:
        return ("pending", "no_candidate", [])
    if len(hits) > 1:
        return ("pending", "ambiguous", hits)
    return ("matched", "crm-case", hits[0])


def decide(ev, calls, groups):
    """The decision for one valid event."""
    sid, mid, t, md = ev
    if sid is not None:
        for c in calls:
            if c["session_id"] == sid:
                return ("matched", "session", c["id"])
        return ("pending", "unknown_session", [])
    if mid is not None:
        if any(g["id"] == mid for g in groups):
            return ("matched", "master_id", mid)
        return ("pending", "unknown_group", [])
    # The samples never carry the keys of both rules, so the order in which rules are tried
    # and whether a rule's no_candidate falls through to the next cannot change the outcome.
    results = [r for r in (rule_phone_and_agent(t, md, calls), rule_crm_case(md, groups)) if r]
    assert len(results) <= 1, f"event carries keys of two rules: {md}"
    return results[0] if results else ("pending", "missing_key", [])


NOT_JSON = object()  # marks a line that does not parse


def read_records():
    """Every record of the queue and the inbox: (file, position, parsed object or error)."""
    recs = []
    for name in ("queue/api-events.ndjson", "inbox/crm-2026-11-03.ndjson"):
        with open(OUT / name) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    recs.append((name, f"line {n}", json.loads(line)))
                except ValueError:
                    recs.append((name, f"line {n}", NOT_JSON))
    with open(OUT / "inbox/cases.csv", newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            recs.append(("inbox/cases.csv", f"line {n}", csv_row_to_obj(row)))
    with open(OUT / "inbox/export.json") as f:
        for i, obj in enumerate(json.load(f)):
            recs.append(("inbox/export.json", f"index {i}", obj))
    return recs


OUTCOMES = ["session", "phone-and-agent", "crm-case", "master_id",
            "unknown_session", "unknown_group", "no_candidate", "ambiguous", "missing_key", "bad"]


def run_oracle(calls, groups):
    decisions = []
    for name, pos, obj in read_records():
        ev = "not JSON" if obj is NOT_JSON else to_event(obj)
        if isinstance(ev, str):
            decisions.append({"file": name, "at": pos, "outcome": "bad", "why": ev})
            continue
        state, what, rest = decide(ev, calls, groups)
        d = {"file": name, "at": pos, "event_time": iso_z(ev[2])}
        if state == "matched":
            d.update(outcome=what, target=rest)
        else:
            d.update(outcome=what)
            if rest:
                d["candidates"] = rest
        decisions.append(d)
    return decisions


def count(decisions, files):
    table = {f: {o: 0 for o in OUTCOMES} for f in files}
    for d in decisions:
        table[d["file"]][d["outcome"]] += 1
    return table


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------

def readme(files, first, second, facts):
    short = {"queue/api-events.ndjson": "queue", "inbox/crm-2026-11-03.ndjson": "crm ndjson",
             "inbox/cases.csv": "cases.csv", "inbox/export.json": "export.json"}
    label = {"session": "attached by SessionId", "phone-and-agent": "matched by phone-and-agent",
             "crm-case": "matched by crm-case", "master_id": "attached by MasterId",
             "unknown_session": "pending: unknown_session", "unknown_group": "pending: unknown_group",
             "no_candidate": "pending: no_candidate", "ambiguous": "pending: ambiguous",
             "missing_key": "pending: missing_key", "bad": "rejected (bad record)"}

    def table(t):
        lines = ["| outcome | " + " | ".join(short[f] for f in files) + " | total |",
                 "|---|" + "---:|" * (len(files) + 1)]
        for o in OUTCOMES:
            row = [t[f][o] for f in files]
            lines.append(f"| {label[o]} | " + " | ".join(map(str, row)) + f" | {sum(row)} |")
        totals = [sum(t[f].values()) for f in files]
        lines.append("| **records** | " + " | ".join(map(str, totals))
                     + f" | {sum(totals)} |")
        return "\n".join(lines)

    return f"""# Sample data for the `demo` job

Generated by `python3 samples/gen.py` (run from the repository root; standard library only,
fixed seed, byte-identical on every run). Do not edit the files by hand: change the generator.
All times lie in 2026-11-02 .. 2026-11-04 UTC; New York is on EST (UTC-05:00) then.

| file | what it holds |
|---|---|
| `call_groups.csv` | {facts['groups']} call groups (`id,metadata`); metadata has `caseNumber` (`C-nnnn`) and `queue` |
| `calls.csv` | {facts['calls']} calls; {facts['grouped']} in a group, {facts['running']} still running (empty `ended_at`), {facts['repeat_phones']} numbers call more than once |
| `calls_late.csv` | `call-late-01` / `sess-late0001`: the call row arrives after its API event; it joins `{facts['late_call_group']}`, which a MasterId event reached before |
| `call_groups_late.csv` | `grp-late-01`: the group arrives after the MasterId event addressed to it |
| `queue/api-events.ndjson` | API events in arrival order (load into `event_queue.payload`); mixed key spellings; a few addressed to a call group by `MasterId` |
| `inbox/crm-2026-11-03.ndjson` | sessionless CRM contacts keyed by `customerPhone` (mixed formats) + `agentId` |
| `inbox/cases.csv` | case updates `SessionId,MasterId,EventTime,crmCaseId,caseStatus,Metadata`; mostly sessionless |
| `inbox/export.json` | a JSON array mixing sessionful, sessionless (incl. `"SessionId": null` and `""`) and bad events |
| `expected.json` | the expected decision for every record, both before and after the late arrivals |

## Expected outcomes

Computed by the generator: it reads the files back and applies the rules of `jobs/demo.toml`
(a record is *bad* when it is not JSON, its EventTime does not parse, Metadata is missing or
not an object, or it has both a SessionId and a MasterId).

First run, with `call_groups.csv` and `calls.csv` loaded:

{table(first)}

After `call_groups_late.csv` and `calls_late.csv` are loaded (the next run retries pending
events): the `sess-late0001` event attaches to `call-late-01`, and the MasterId event for
`grp-late-01` to that group.

{table(second)}

## What `callrecon demo` prints

`callrecon demo` puts the queue file's records on `event_queue` as a producer would. Of its
{facts['queue_records']} records, {facts['queue_not_json']} {"is" if facts['queue_not_json'] == 1 else "are"} not JSON and cannot be stored in `event_queue.payload` (a
`jsonb` column): the demo queues {facts['queue_records'] - facts['queue_not_json']} events, and its first run reports
{facts['bad'] - facts['queue_not_json']} rejected records where the tables above count {facts['bad']} bad ones. It ingests the
{facts['valid']} valid events; every other count is the tables'.

## Cases worth looking at

- Merge order: `{facts['merge_call']}` gets two queue events setting `customerDataField1` /
  `accountTier`. The one with the later EventTime (`{facts['merge_late']}`, `"platinum"`)
  is on line {facts['merge_late_line']}; the earlier one (`{facts['merge_early']}`, `"gold"`)
  arrives later, on line {facts['merge_early_line']}. Merged by event time, the call's
  async_metadata ends with `"customerDataField1": "platinum"`.
- Nearest wins: {facts['nearest']}. Caller and agent match both calls of a
  close pair (12 minutes apart); the event is 3 minutes after the first call, so it goes to
  the first.
- Ambiguous: {facts['ambiguous']}. Each is exactly halfway (6 minutes) between two calls of
  the same caller with the same agent.
- Window edge: {facts['edge']} is exactly 10 minutes before the call's start (the window is
  inclusive, so it matches).
- Local time: {facts['local']} has no offset and is read as America/New_York (EST).
- cases.csv is read as: `SessionId` and `EventTime` columns, the `Metadata` column as a JSON
  object (empty = `{{}}`), and the other non-empty columns (`crmCaseId`, `caseStatus`) added to
  the metadata.
- MasterId: {facts['master']} are addressed to a call group by id (any key spelling; a
  `MasterId` column in cases.csv); they reach the group and every call in it, whatever the
  rules say. `call-late-01` joins `{facts['late_call_group']}` in the second run and gets the
  fields of the MasterId event sent to that group before it existed.
- No sample event carries the keys of both rules, so rule order does not change the counts.
"""


def expected_json(expected):
    """Pretty JSON, but one decision per line so that diffs stay readable."""
    parts = []
    for k, v in expected.items():
        if isinstance(v, list):
            body = ",\n".join("    " + json.dumps(d) for d in v)
            parts.append(f"  {json.dumps(k)}: [\n{body}\n  ]")
        else:
            inner = json.dumps(v, indent=2).replace("\n", "\n  ")
            parts.append(f"  {json.dumps(k)}: {inner}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main():
    phones_taken, sessions_taken = set(), {"sess-late0001", "sess-missing01", "sess-missing02"}
    groups = make_groups()
    calls, pair_calls = make_calls(groups, phones_taken, sessions_taken)
    late_call = make_late_call(groups, phones_taken)
    late_group = make_late_group()

    # Calls with a special role are kept out of the random picks so nothing else touches them.
    merge_call = next(c for c in calls if c["tag"] == "single" and c["ended_at"]
                      and c["ended_at"] - c["started_at"] > timedelta(minutes=8))
    reserved = {"merge": merge_call}
    reserved.update({c["id"]: c for pair in pair_calls for c in pair})
    reserved[merge_call["id"]] = merge_call

    queue = make_queue(calls, late_call, reserved, groups, late_group)
    used_targets = set()
    crm = make_crm_inbox(calls, pair_calls, reserved, phones_taken, used_targets)
    cases_text, cases_expect = make_cases_inbox(calls, groups, used_targets)
    export, export_expect = make_export_inbox(calls, groups, reserved, used_targets)

    (OUT / "queue").mkdir(exist_ok=True)
    (OUT / "inbox").mkdir(exist_ok=True)
    write_groups(OUT / "call_groups.csv", groups)
    write_calls(OUT / "calls.csv", calls)
    write_calls(OUT / "calls_late.csv", [late_call])
    write_groups(OUT / "call_groups_late.csv", [late_group])
    (OUT / "queue/api-events.ndjson").write_text("".join(l + "\n" for l, _ in queue))
    (OUT / "inbox/crm-2026-11-03.ndjson").write_text("".join(l + "\n" for l, _ in crm))
    (OUT / "inbox/cases.csv").write_text(cases_text)
    (OUT / "inbox/export.json").write_text(json.dumps(export, indent=2) + "\n")

    # Oracle, twice: before and after the late call's row arrives.
    groups_read = read_groups(OUT / "call_groups.csv")
    calls_read = read_calls(OUT / "calls.csv")
    late_read = read_calls(OUT / "calls_late.csv")
    late_groups_read = read_groups(OUT / "call_groups_late.csv")
    first = run_oracle(calls_read, groups_read)
    second = run_oracle(calls_read + late_read, groups_read + late_groups_read)

    # The plan and the oracle must agree record by record.
    plan = ([e for _, e in queue] + [e for _, e in crm] + cases_expect + export_expect)
    assert len(plan) == len(first), (len(plan), len(first))
    for expect, d1, d2 in zip(plan, first, second):
        if expect[0] == "late":
            want1, want2 = ("unknown_session", None), ("session", expect[1])
        elif expect[0] == "late_group":
            want1, want2 = ("unknown_group", None), ("master_id", expect[1])
        elif expect[0] == "matched":
            want1 = want2 = (expect[1], expect[2])
        else:
            want1 = want2 = (expect[-1], None)
        for want, d in ((want1, d1), (want2, d2)):
            assert (d["outcome"], d.get("target")) == want, (expect, d)

    files = ["queue/api-events.ndjson", "inbox/crm-2026-11-03.ndjson",
             "inbox/cases.csv", "inbox/export.json"]
    t1, t2 = count(first, files), count(second, files)

    def at(pred):
        return ", ".join(f"`{d['file']}` {d['at']}" for d in first if pred(d))

    queue_lines = [json.loads(l) if e != ("bad",) else None for l, e in queue]
    merge_lines = [i + 1 for i, o in enumerate(queue_lines)
                   if o and o.get("SessionId") == merge_call["session_id"]]
    crm_lines = [json.loads(l) for l, _ in crm]
    edge = next(i for i, (l, e) in enumerate(crm)
                if e[0] == "matched" and parse_time(crm_lines[i]["EventTime"]) == next(
                    c for c in calls if c["id"] == e[2])["started_at"] - WINDOW)
    local = next(i for i, o in enumerate(crm_lines)
                 if isinstance(o.get("EventTime"), str) and TIME_RE.match(o["EventTime"])
                 and TIME_RE.match(o["EventTime"]).group(9) is None)
    nearest = next(d for d in first if d.get("target") == pair_calls[0][0]["id"])
    facts = {
        "groups": len(groups), "calls": len(calls),
        "grouped": sum(1 for c in calls if c["call_group_id"]),
        "running": sum(1 for c in calls if not c["ended_at"]),
        "repeat_phones": sum(1 for p in {c["ani"] for c in calls}
                             if sum(1 for c in calls if c["ani"] == p) > 1),
        "merge_call": merge_call["id"],
        "merge_late": queue_lines[merge_lines[0] - 1]["EventTime"],
        "merge_early": queue_lines[merge_lines[1] - 1]["EventTime"],
        "merge_late_line": merge_lines[0], "merge_early_line": merge_lines[1],
        "nearest": f"`{nearest['file']}` {nearest['at']} -> `{nearest['target']}`",
        "ambiguous": at(lambda d: d["outcome"] == "ambiguous"),
        "edge": f"`inbox/crm-2026-11-03.ndjson` line {edge + 1} (`{crm[edge][1][2]}`)",
        "local": f"`inbox/crm-2026-11-03.ndjson` line {local + 1} "
                 f"(`{crm_lines[local]['EventTime']}` -> `{crm[local][1][2]}`)",
        "master": at(lambda d: d["outcome"] in ("master_id", "unknown_group")),
        "late_call_group": late_call["call_group_id"],
        "queue_records": sum(1 for d in first if d["file"] == files[0]),
        "queue_not_json": sum(1 for d in first if d["file"] == files[0] and d.get("why") == "not JSON"),
        "bad": sum(1 for d in first if d["outcome"] == "bad"),
        "valid": sum(1 for d in first if d["outcome"] != "bad"),
    }
    assert len(merge_lines) == 2 and merge_lines[0] < merge_lines[1]

    (OUT / "README.md").write_text(readme(files, t1, t2, facts))
    expected = {
        "counts": {"first_run": t1, "after_calls_late": t2},
        "totals": {"first_run": {o: sum(t1[f][o] for f in files) for o in OUTCOMES},
                   "after_calls_late": {o: sum(t2[f][o] for f in files) for o in OUTCOMES}},
        "merge_order": {"call": merge_call["id"], "customerDataField1": "platinum"},
        "first_run": first,
        "after_calls_late": second,
    }
    (OUT / "expected.json").write_text(expected_json(expected))

    for name, tt in (("first run", t1), ("after the late arrivals", t2)):
        print(name + ": " + ", ".join(f"{o}={sum(tt[f][o] for f in files)}" for o in OUTCOMES))


if __name__ == "__main__":
    main()
