-- The sample catalogue, created on both staging and production.
CREATE TABLE catentry (
    catentry_id bigint PRIMARY KEY,
    partnumber varchar(64) NOT NULL,
    member_id bigint NOT NULL,
    published boolean NOT NULL DEFAULT true,
    lastupdate timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE catentdesc (
    catentry_id bigint NOT NULL REFERENCES catentry ON DELETE CASCADE,
    language_id integer NOT NULL,
    name varchar(128),
    longdescription text,
    PRIMARY KEY (catentry_id, language_id)
);
CREATE TABLE offerprice (
    offer_id bigint NOT NULL,
    currency char(3) NOT NULL,
    price numeric(20, 5) NOT NULL,
    PRIMARY KEY (offer_id, currency)
);
