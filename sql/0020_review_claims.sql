-- The review desk's claims (issue 42): which analyst has an event open, until when (a few
-- minutes after the page was last opened), shown to the others as "ana is on this". A claim
-- only informs: a decision is refused when the event changed since its page was loaded, never
-- for a claim. Expired claims are taken over by the next analyst to open the event and
-- forgotten by the API's hourly housekeeping.
create table review_claims (
    event_id bigint primary key,
    analyst  text not null,
    until    timestamptz not null
);
