-- Collectors hold the projects table in memory. Tell them at once when it changes (they also
-- reload it every --projects-refresh-ms, so a missed notice only delays a change).
CREATE FUNCTION tracklet_projects_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tracklet_projects', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER projects_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON projects
    FOR EACH STATEMENT EXECUTE FUNCTION tracklet_projects_changed();
